# The tiny Sparse4D v3 with turbox_mm switched on (its stock twin plus _base_/turbox.py).
_base_ = ['./sparse4dv3_tiny_stock.py', '../_base_/turbox.py']
