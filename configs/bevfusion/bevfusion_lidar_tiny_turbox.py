# The turbox twin of the tiny lidar-only BEVFusion: the tiny stock config plus turbox_mm's base
# file, nothing else.
_base_ = ['./bevfusion_lidar_tiny_stock.py', '../_base_/turbox.py']
