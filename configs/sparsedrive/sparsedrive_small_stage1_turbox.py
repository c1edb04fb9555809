# SparseDrive stage 1 with turbox_mm: the stock config plus the one file that switches turbox_mm
# on.
_base_ = ['./sparsedrive_small_stage1_stock.py', '../_base_/turbox.py']
