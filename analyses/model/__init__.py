"""Model level (IMPACT sec. 3.5 / 4.5, Table 4, Figure 4): Chefer / AttnLRP attribution, insertion and deletion, the runner."""
