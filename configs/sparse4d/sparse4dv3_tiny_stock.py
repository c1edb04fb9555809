# A tiny Sparse4D v3 for CPU tests and the no-GPU demo: ResNet-18, 64 features, 32 anchors,
# 2 decoder layers, 64x176 images (from the 320x180 synthetic dataset), batch 2, fp32.
# Everything else (pipeline, losses, sampler, denoising, temporal logic, detection and tracking
# evaluation) is the stock config's, but for the regression losses' score gate and the tracking
# threshold (both off, see below).
#
#     python tools/create_data.py synthetic --out data/nuscenes_tiny --scenes 2 --frames 6 \
#         --image-size 320x180 --points 4000 --sweeps 0 --val-scenes 1
#     python tools/sparse4d_anchors.py data/nuscenes_tiny/nuscenes_infos_train.pkl \
#         --out data/nuscenes_tiny/nuscenes_kmeans900.npy --num 32
_base_ = ['./sparse4dv3_r50_8xb6-100e_nus-256x704_stock.py']

data_root = '{{$NUSCENES_ROOT:data/nuscenes_tiny/}}'
embed_dims = 64
num_groups = 4
batch_size = 2
max_iters = 20
input_shape = (176, 64)  # (W, H)
attention = dict(type='MultiheadAttention', embed_dims=embed_dims * 2, num_heads=num_groups,
                 batch_first=True, dropout=0.1)

model = dict(
    img_backbone=dict(depth=18, with_cp=False, init_cfg=None),  # from scratch: no download
    img_neck=dict(in_channels=[64, 128, 256, 512], out_channels=embed_dims),
    depth_branch=dict(embed_dims=embed_dims),
    head=dict(
        num_decoder=2,
        # No score gate on the regression losses: in 20 iterations from scratch the class
        # scores barely pass upstream's 0.05, and the box losses would switch on half way.
        cls_threshold_to_reg=-1,
        instance_bank=dict(num_anchor=32, embed_dims=embed_dims, num_temp_instances=16,
                           anchor=data_root + 'nuscenes_kmeans900.npy'),
        anchor_encoder=dict(embed_dims=[32, 8, 8, 16]),
        temp_graph_model=attention,
        graph_model=attention,
        norm_layer=dict(normalized_shape=embed_dims),
        ffn=dict(in_channels=embed_dims * 2, embed_dims=embed_dims,
                 feedforward_channels=embed_dims * 2),
        deformable_model=dict(embed_dims=embed_dims, num_groups=num_groups,
                              kps_generator=dict(embed_dims=embed_dims)),
        refine_layer=dict(embed_dims=embed_dims),
        sampler=dict(num_dn_groups=2, num_temp_dn_groups=1, max_dn_gt=8),
        decoder=dict(num_output=16)))

data_aug_conf = dict(resize_lim=(0.56, 0.62), final_dim=input_shape[::-1],
                     bot_pct_lim=(0.0, 0.0), rot_lim=(-5.4, 5.4), H=180, W=320,
                     rand_flip=True, rot3d_range=[-0.3925, 0.3925])
train_dataloader = dict(
    batch_size=batch_size, num_workers=0,
    dataset=dict(data_root=data_root, data_aug_conf=data_aug_conf))
val_dataloader = dict(num_workers=0,
                      dataset=dict(data_root=data_root, data_aug_conf=data_aug_conf))
test_dataloader = val_dataloader
# Tracking boxes from every class score: a model of 20 iterations from scratch scores below
# upstream's tracking_threshold of 0.2, and without boxes there are no tracks to evaluate.
val_evaluator = dict(metrics=dict(data_root=data_root,
                                  ann_file=data_root + 'nuscenes_infos_val.pkl',
                                  tracking_threshold=0.0))
test_evaluator = val_evaluator

train_cfg = dict(max_iters=max_iters, val_interval=max_iters)
optim_wrapper = dict(_delete_=True, type='OptimWrapper',
                     optimizer=dict(type='AdamW', lr=2e-3, weight_decay=1e-3),
                     paramwise_cfg=dict(custom_keys={'img_backbone': dict(lr_mult=0.5)}),
                     clip_grad=dict(max_norm=25, norm_type=2))
param_scheduler = [
    dict(type='LinearLR', start_factor=1.0 / 3, by_epoch=False, begin=0, end=5),
    dict(type='CosineAnnealingLR', T_max=max_iters, eta_min_ratio=1e-3, by_epoch=False,
         begin=0, end=max_iters),
]
default_hooks = dict(logger=dict(interval=1),
                     checkpoint=dict(interval=max_iters))
log_processor = dict(window_size=1)
