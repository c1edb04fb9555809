# The turbox twin of mmdet3d 1.4's own pointpillars_hv_secfpn_sbn-all_8xb4-2x_nus-3d.py:
# the shipped config plus turbox_mm's base file, nothing else.
_base_ = [
    './pointpillars_hv_secfpn_sbn-all_8xb4-2x_nus-3d_stock.py',
    '../_base_/turbox.py',
]
