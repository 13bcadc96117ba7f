"""Networks: the 2D toy MLP and the ADM U-Net for images."""
