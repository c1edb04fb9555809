# A tiny SparseDrive stage 1 for CPU tests: ResNet-18, 64 features, 32 det and 8 map anchors,
# 2 decoder layers, 64x176 images (from the 320x180 synthetic dataset), batch 2, fp32 (also in
# the attention, which the full config computes in fp16 as upstream).
# Everything else (pipeline, heads, targets, losses, temporal logic, detection, tracking and map
# evaluation) is the stock config's, but for the score gate of the regression losses and the
# tracking threshold (both off, as in the tiny Sparse4D config).
#
#     python tools/create_data.py synthetic --out data/nuscenes_tiny --scenes 3 --frames 6 \
#         --image-size 320x180 --points 4000 --sweeps 0 --val-scenes 1
#     python tools/sparsedrive_anchors.py det data/nuscenes_tiny/nuscenes_infos_train.pkl \
#         --out data/nuscenes_tiny/kmeans/kmeans_det_900.npy --num 32
#     python tools/sparsedrive_anchors.py map data/nuscenes_tiny/nuscenes_infos_train.pkl \
#         --out data/nuscenes_tiny/kmeans/kmeans_map_100.npy --num 8
_base_ = ['./sparsedrive_small_stage1_stock.py']

data_root = '{{$NUSCENES_ROOT:data/nuscenes_tiny/}}'
embed_dims = 64
num_groups = 4
batch_size = 2
max_iters = 20
num_decoder = 2
input_shape = (176, 64)  # (W, H)
det_attention = dict(type='turbox_mm.MultiheadFlashAttention', embed_dims=embed_dims * 2,
                     num_heads=num_groups, batch_first=True, dropout=0.1)
map_attention = dict(det_attention, embed_dims=embed_dims)
ffn = dict(in_channels=embed_dims * 2, embed_dims=embed_dims,
           feedforward_channels=embed_dims * 2)
single_layer = ['gnn', 'norm', 'deformable', 'ffn', 'norm', 'refine']

model = dict(
    img_backbone=dict(depth=18, with_cp=False, init_cfg=None),  # from scratch: no download
    img_neck=dict(in_channels=[64, 128, 256, 512], out_channels=embed_dims),
    depth_branch=dict(embed_dims=embed_dims),
    head=dict(
        det_head=dict(
            num_decoder=num_decoder,
            # No score gate on the regression losses: in 20 iterations from scratch the class
            # scores barely pass upstream's 0.05.
            cls_threshold_to_reg=-1,
            instance_bank=dict(num_anchor=32, embed_dims=embed_dims, num_temp_instances=16,
                               anchor=data_root + 'kmeans/kmeans_det_900.npy'),
            anchor_encoder=dict(embed_dims=[32, 8, 8, 16]),
            temp_graph_model=det_attention,
            graph_model=det_attention,
            norm_layer=dict(normalized_shape=embed_dims),
            ffn=ffn,
            deformable_model=dict(embed_dims=embed_dims, num_groups=num_groups,
                                  kps_generator=dict(embed_dims=embed_dims)),
            refine_layer=dict(embed_dims=embed_dims),
            decoder=dict(num_output=16)),
        map_head=dict(
            num_decoder=num_decoder,
            cls_threshold_to_reg=-1,
            operation_order=single_layer + ['temp_gnn'] + single_layer,
            instance_bank=dict(num_anchor=8, embed_dims=embed_dims,
                               anchor=data_root + 'kmeans/kmeans_map_100.npy'),
            anchor_encoder=dict(embed_dims=embed_dims),
            temp_graph_model=map_attention,
            graph_model=map_attention,
            norm_layer=dict(normalized_shape=embed_dims),
            ffn=ffn,
            deformable_model=dict(embed_dims=embed_dims, num_groups=num_groups,
                                  kps_generator=dict(embed_dims=embed_dims)),
            refine_layer=dict(embed_dims=embed_dims),
            decoder=dict(num_output=8))))

data_aug_conf = dict(resize_lim=(0.56, 0.62), final_dim=input_shape[::-1],
                     bot_pct_lim=(0.0, 0.0), rot_lim=(-5.4, 5.4), H=180, W=320,
                     rand_flip=True, rot3d_range=[0, 0])
train_dataloader = dict(
    batch_size=batch_size, num_workers=0,
    dataset=dict(data_root=data_root, data_aug_conf=data_aug_conf))
val_dataloader = dict(num_workers=0,
                      dataset=dict(data_root=data_root, data_aug_conf=data_aug_conf))
test_dataloader = val_dataloader
# Tracking boxes from every class score (a model of 20 iterations scores below 0.2).
val_evaluator = dict(metrics=[
    dict(type='turbox_mm.NuScenesTrackingMetric', data_root=data_root,
         ann_file=data_root + 'nuscenes_infos_val.pkl', metric=['bbox', 'tracking'],
         tracking_threshold=0.0, modality=dict(use_camera=True, use_lidar=False),
         backend_args=None),
    dict(type='turbox_mm.SparseDriveMapMetric',
         classes=['ped_crossing', 'divider', 'boundary']),
])
test_evaluator = val_evaluator

train_cfg = dict(max_iters=max_iters, val_interval=max_iters)
# fp32 on the CPU (the full config evaluates in fp16, as upstream).
val_cfg = dict(fp16=False)
test_cfg = dict(fp16=False)
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
