"""nixboot TFTP service: boot programs and just-in-time menus."""
