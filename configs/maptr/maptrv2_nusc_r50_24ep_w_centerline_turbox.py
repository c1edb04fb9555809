# MapTR v2 with the centerline class and turbox_mm: the stock config plus the one file that
# switches turbox_mm on.
_base_ = ['./maptrv2_nusc_r50_24ep_w_centerline_stock.py', '../_base_/turbox.py']
