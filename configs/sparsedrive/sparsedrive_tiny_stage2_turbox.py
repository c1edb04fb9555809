# The tiny SparseDrive stage 2 with turbox_mm: the tiny stock config plus turbox_mm's base.
_base_ = ['./sparsedrive_tiny_stage2_stock.py', '../_base_/turbox.py']
