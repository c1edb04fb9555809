# MapTR v2 with turbox_mm: the stock config plus the one file that switches turbox_mm on.
_base_ = ['./maptrv2_nusc_r50_24ep_stock.py', '../_base_/turbox.py']
