# MapTR v1 with turbox_mm: the stock config plus the one file that switches turbox_mm on.
_base_ = ['./maptr_tiny_r50_24e_stock.py', '../_base_/turbox.py']
