"""Provider bills: importing FOCUS exports, matching them to metered nodes, and the true-up of
metered GPU cost to what the bill says was paid (design §11)."""
