# The turbox twin of mmdet3d 1.4's own centerpoint_voxel0075_second_secfpn_8xb4-cyclic-20e_nus-3d.py:
# the shipped config plus turbox_mm's base file, nothing else.
_base_ = [
    './centerpoint_voxel0075_second_secfpn_8xb4-cyclic-20e_nus-3d_stock.py',
    '../_base_/turbox.py',
]
