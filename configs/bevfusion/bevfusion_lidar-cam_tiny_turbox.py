# The turbox twin of the tiny camera + lidar BEVFusion: the tiny stock config plus turbox_mm's
# base file, nothing else.
_base_ = ['./bevfusion_lidar-cam_tiny_stock.py', '../_base_/turbox.py']
