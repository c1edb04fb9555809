# Sparse4D v3 with turbox_mm: the stock config plus the one file that switches turbox_mm on.
_base_ = ['./sparse4dv3_r50_8xb6-100e_nus-256x704_stock.py', '../_base_/turbox.py']
