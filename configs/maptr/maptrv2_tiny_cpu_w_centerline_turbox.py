# The turbox twin of the tiny MapTR v2 with centerlines: the tiny stock config plus
# turbox_mm's base file, nothing else.
_base_ = ['./maptrv2_tiny_cpu_w_centerline_stock.py', '../_base_/turbox.py']
