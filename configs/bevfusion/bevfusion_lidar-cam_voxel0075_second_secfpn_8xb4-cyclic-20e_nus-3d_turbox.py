# The turbox twin of the camera + lidar BEVFusion config: the stock config plus turbox_mm's base
# file, nothing else.
_base_ = [
    './bevfusion_lidar-cam_voxel0075_second_secfpn_8xb4-cyclic-20e_nus-3d_stock.py',
    '../_base_/turbox.py',
]
