# mmdet3d 1.4's own config, exactly as the mmdet3d package ships it. It reads data/nuscenes/
# (mmdet3d's v2 infos and GT database; tools/lidar_benchmark.sh links the synthetic set
# there). Its turbox twin is the _turbox.py file beside this one.
_base_ = ['mmdet3d::pointpillars/pointpillars_hv_secfpn_sbn-all_8xb4-2x_nus-3d.py']
