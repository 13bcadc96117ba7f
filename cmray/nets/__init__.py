"""Networks: the 2D toy MLP now; U-Nets for images later."""
