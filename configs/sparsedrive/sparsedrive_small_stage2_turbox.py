# SparseDrive stage 2 with turbox_mm: the stock config plus the one file that switches turbox_mm
# on.
_base_ = ['./sparsedrive_small_stage2_stock.py', '../_base_/turbox.py']
