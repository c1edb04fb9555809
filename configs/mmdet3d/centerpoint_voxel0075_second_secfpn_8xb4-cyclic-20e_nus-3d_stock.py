# mmdet3d 1.4's own config, exactly as the mmdet3d package ships it. It reads data/nuscenes/
# (mmdet3d's v2 infos and GT database; tools/lidar_benchmark.sh links the synthetic set
# there). Its turbox twin is the _turbox.py file beside this one.
_base_ = ['mmdet3d::centerpoint/centerpoint_voxel0075_second_secfpn_8xb4-cyclic-20e_nus-3d.py']
