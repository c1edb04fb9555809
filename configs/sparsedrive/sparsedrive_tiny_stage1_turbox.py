# The tiny SparseDrive stage 1 with turbox_mm: the tiny stock config plus turbox_mm's base.
_base_ = ['./sparsedrive_tiny_stage1_stock.py', '../_base_/turbox.py']
