"""Named class subsets of ImageNet-1k, as wnids grouped by semantic category.

``impact100``: the 100 ImageNet categories used for circuit analysis, 13 semantic groups. The
paper draws 100 categories spanning 13 groups but does not list them, so this list is our own
choice, made once and frozen so that results stay comparable:

* groups follow the coarse branches of the WordNet hierarchy that ImageNet-1k covers: six animal
  groups (fish, birds, reptiles and amphibians, invertebrates, dogs, other mammals), four groups
  of artefacts (land vehicles, watercraft and aircraft, musical instruments, household objects),
  clothing and accessories, food, and places (buildings and landscapes);
* the nine larger groups get 8 classes, the four smaller ones 7 (9 x 8 + 4 x 7 = 100);
* within a group we picked well-known, visually distinct basic-level categories (e.g. one or two
  dog breeds per coat type, not twenty terriers), avoiding ImageNet's near-duplicate pairs
  (e.g. ``crane`` bird/machine, ``maillot``, laptop/notebook) so that each class is a clean
  target for "class vs rest" probing.

Every wnid was checked against timm's ImageNet-1k class list (:class:`timm.data.ImageNetInfo`);
``IMPACT100`` is the groups' wnids in group order.
"""

from __future__ import annotations

IMPACT100_GROUPS: dict[str, tuple[str, ...]] = {
    "fish": (
        "n01440764",  # 0 tench
        "n01443537",  # 1 goldfish
        "n01484850",  # 2 great white shark
        "n01494475",  # 4 hammerhead
        "n01498041",  # 6 stingray
        "n02526121",  # 390 eel
        "n02607072",  # 393 anemone fish
        "n02655020",  # 397 puffer
    ),
    "birds": (
        "n01514668",  # 7 cock
        "n01518878",  # 9 ostrich
        "n01531178",  # 11 goldfinch
        "n01614925",  # 22 bald eagle
        "n01622779",  # 24 great grey owl
        "n01806143",  # 84 peacock
        "n01843383",  # 96 toucan
        "n02007558",  # 130 flamingo
    ),
    "reptiles_amphibians": (
        "n01629819",  # 25 European fire salamander
        "n01641577",  # 30 bullfrog
        "n01664065",  # 33 loggerhead turtle
        "n01677366",  # 39 common iguana
        "n01694178",  # 47 African chameleon
        "n01695060",  # 48 Komodo dragon
        "n01698640",  # 50 American alligator
        "n01749939",  # 64 green mamba
    ),
    "invertebrates": (
        "n01768244",  # 69 trilobite
        "n01770393",  # 71 scorpion
        "n01774750",  # 76 tarantula
        "n01910747",  # 107 jellyfish
        "n01944390",  # 113 snail
        "n01983481",  # 122 American lobster
        "n02165456",  # 301 ladybug
        "n02279972",  # 323 monarch butterfly
    ),
    "dogs": (
        "n02085620",  # 151 Chihuahua
        "n02088364",  # 162 beagle
        "n02099601",  # 207 golden retriever
        "n02099712",  # 208 Labrador retriever
        "n02106662",  # 235 German shepherd
        "n02110185",  # 250 Siberian husky
        "n02110958",  # 254 pug
        "n02111889",  # 258 Samoyed
    ),
    "other_mammals": (
        "n02114367",  # 269 timber wolf
        "n02119022",  # 277 red fox
        "n02123045",  # 281 tabby cat
        "n02129165",  # 291 lion
        "n02129604",  # 292 tiger
        "n02391049",  # 340 zebra
        "n02504458",  # 386 African elephant
        "n02510455",  # 388 giant panda
    ),
    "land_vehicles": (
        "n02701002",  # 407 ambulance
        "n03345487",  # 555 fire engine
        "n03417042",  # 569 garbage truck
        "n03594945",  # 609 jeep
        "n04146614",  # 779 school bus
        "n04285008",  # 817 sports car
        "n04310018",  # 820 steam locomotive
        "n04465501",  # 866 tractor
    ),
    "watercraft_aircraft": (
        "n02690373",  # 404 airliner
        "n02692877",  # 405 airship
        "n02951358",  # 472 canoe
        "n03095699",  # 510 container ship
        "n03344393",  # 554 fireboat
        "n04273569",  # 814 speedboat
        "n04347754",  # 833 submarine
        "n04552348",  # 895 warplane
    ),
    "food": (
        "n07614500",  # 928 ice cream
        "n07693725",  # 931 bagel
        "n07697313",  # 933 cheeseburger
        "n07697537",  # 934 hotdog
        "n07714990",  # 937 broccoli
        "n07745940",  # 949 strawberry
        "n07753592",  # 954 banana
        "n07873807",  # 963 pizza
    ),
    "musical_instruments": (
        "n02672831",  # 401 accordion
        "n02676566",  # 402 acoustic guitar
        "n02787622",  # 420 banjo
        "n02992211",  # 486 cello
        "n03452741",  # 579 grand piano
        "n04487394",  # 875 trombone
        "n04536866",  # 889 violin
    ),
    "clothing_accessories": (
        "n02883205",  # 457 bow tie
        "n03124170",  # 515 cowboy hat
        "n03595614",  # 610 jersey
        "n03617480",  # 614 kimono
        "n04120489",  # 770 running shoe
        "n04259630",  # 808 sombrero
        "n04356056",  # 837 sunglasses
    ),
    "household_objects": (
        "n03063599",  # 504 coffee mug
        "n04099969",  # 765 rocking chair
        "n04344873",  # 831 studio couch
        "n04380533",  # 846 table lamp
        "n04398044",  # 849 teapot
        "n04442312",  # 859 toaster
        "n04548280",  # 892 wall clock
    ),
    "places_landscapes": (
        "n02980441",  # 483 castle
        "n03028079",  # 497 church
        "n04366367",  # 839 suspension bridge
        "n09193705",  # 970 alp
        "n09256479",  # 973 coral reef
        "n09428293",  # 978 seashore
        "n09472597",  # 980 volcano
    ),
}

IMPACT100: tuple[str, ...] = tuple(w for group in IMPACT100_GROUPS.values() for w in group)

NAMED_SUBSETS: dict[str, tuple[str, ...]] = {"impact100": IMPACT100}
SUBSET_GROUPS: dict[str, dict[str, tuple[str, ...]]] = {"impact100": IMPACT100_GROUPS}


def named_subset(name: str) -> tuple[str, ...]:
    """The ImageNet wnids of named subset ``name`` (e.g. ``"impact100"``: 100 wnids)."""
    if name not in NAMED_SUBSETS:
        raise ValueError(f"unknown named subset {name!r}; known: {', '.join(sorted(NAMED_SUBSETS))} "
                         "(or pass a list of class indices / ids)")
    return NAMED_SUBSETS[name]


def subset_groups(name: str) -> dict[str, tuple[str, ...]]:
    """Semantic group -> wnids of named subset ``name`` (``"impact100"``: 13 groups)."""
    named_subset(name)
    return SUBSET_GROUPS[name]
