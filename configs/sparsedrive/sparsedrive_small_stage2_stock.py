# SparseDrive stage 2 (detection, tracking, map, motion prediction and planning), ResNet-50, 6
# cameras at 256x704, 8 GPUs x 6 samples, 10 epochs on nuScenes from the stage-1 model:
# upstream's setting (swc-17/SparseDrive, projects/configs/sparsedrive_small_stage2.py @
# ffebeb4) on mmengine / mmdet3d 1.4, with stock components and stock ops. It is stage 1's
# config (sparsedrive_small_stage1_stock.py) with upstream's stage-2 differences:
# docs/design/sparsedrive.md, sections 1 and 6.
#
# Anchors, beside stage 1's (configs/sparsedrive/README.md):
#     python tools/sparsedrive_anchors.py motion $NUSCENES_ROOT/nuscenes_infos_train.pkl \
#         --out $NUSCENES_ROOT/kmeans/kmeans_motion_6.npy
#     python tools/sparsedrive_anchors.py plan $NUSCENES_ROOT/nuscenes_infos_train.pkl \
#         --out $NUSCENES_ROOT/kmeans/kmeans_plan_6.npy
# Training starts from the stage-1 checkpoint (load_from; the motion head's weights are new).
_base_ = ['./sparsedrive_small_stage1_stock.py']

data_root = '{{$NUSCENES_ROOT:data/nuscenes/}}'

batch_size = 6
num_iters_per_epoch = 28130 // (8 * batch_size)
num_epochs = 10
max_iters = num_iters_per_epoch * num_epochs
checkpoint_interval = num_iters_per_epoch * 10
fut_ts = 12
fut_mode = 6
ego_fut_ts = 6
ego_fut_mode = 6
queue_length = 4  # history + current

motion_attention = dict(type='turbox_mm.MultiheadFlashAttention', embed_dims=512, num_heads=8,
                        batch_first=True, dropout=0.1, fp16_compute=True)
model = dict(
    head=dict(
        task_config=dict(with_motion_plan=True),
        # The map bank carries 33 instances from frame to frame in stage 2.
        map_head=dict(instance_bank=dict(num_temp_instances=33)),
        motion_plan_head=dict(
            type='turbox_mm.MotionPlanningHead',
            fut_ts=fut_ts,
            fut_mode=fut_mode,
            ego_fut_ts=ego_fut_ts,
            ego_fut_mode=ego_fut_mode,
            motion_anchor=data_root + f'kmeans/kmeans_motion_{fut_mode}.npy',
            plan_anchor=data_root + f'kmeans/kmeans_plan_{ego_fut_mode}.npy',
            embed_dims=256,
            decouple_attn=True,
            instance_queue=dict(type='turbox_mm.InstanceQueue', embed_dims=256,
                                queue_length=queue_length, tracking_threshold=0.2,
                                feature_map_scale=(256 / 32, 704 / 32)),
            operation_order=['temp_gnn', 'gnn', 'norm', 'cross_gnn', 'norm', 'ffn', 'norm'] * 3
            + ['refine'],
            # upstream: mmcv's attention here (key padding masks), flash attention elsewhere
            temp_graph_model=dict(type='MultiheadAttention', embed_dims=512, num_heads=8,
                                  batch_first=True, dropout=0.1),
            graph_model=motion_attention,
            cross_graph_model=dict(motion_attention, embed_dims=256),
            norm_layer=dict(type='LN', normalized_shape=256),
            ffn=dict(type='turbox_mm.AsymmetricFFN', in_channels=256, pre_norm=True,
                     embed_dims=256, feedforward_channels=512, num_fcs=2, ffn_drop=0.1,
                     act_cfg=dict(type='ReLU', inplace=True), identity_by_hidden=True),
            refine_layer=dict(type='turbox_mm.MotionPlanningRefinementModule', embed_dims=256,
                              fut_ts=fut_ts, fut_mode=fut_mode, ego_fut_ts=ego_fut_ts,
                              ego_fut_mode=ego_fut_mode),
            motion_sampler=dict(type='turbox_mm.MotionTarget'),
            motion_loss_cls=dict(type='mmdet.FocalLoss', use_sigmoid=True, gamma=2.0,
                                 alpha=0.25, loss_weight=0.2),
            motion_loss_reg=dict(type='mmdet.L1Loss', loss_weight=0.2),
            planning_sampler=dict(type='turbox_mm.PlanningTarget', ego_fut_ts=ego_fut_ts,
                                  ego_fut_mode=ego_fut_mode),
            plan_loss_cls=dict(type='mmdet.FocalLoss', use_sigmoid=True, gamma=2.0,
                               alpha=0.25, loss_weight=0.5),
            plan_loss_reg=dict(type='mmdet.L1Loss', loss_weight=1.0),
            plan_loss_status=dict(type='mmdet.L1Loss', loss_weight=1.0),
            motion_decoder=dict(type='turbox_mm.SparseBox3DMotionDecoder'),
            planning_decoder=dict(type='turbox_mm.HierarchicalPlanningDecoder',
                                  ego_fut_ts=ego_fut_ts, ego_fut_mode=ego_fut_mode,
                                  use_rescore=True),
            num_det=50,
            num_map=10)))

train_dataloader = dict(batch_size=batch_size, num_workers=batch_size)
# The planning metric needs the future boxes of each evaluated sample.
val_dataloader = dict(dataset=dict(with_fut_boxes=True))
test_dataloader = val_dataloader
# Upstream's stage-2 eval modes: detection, tracking, map, motion and planning.
val_evaluator = dict(metrics=[
    dict(type='turbox_mm.NuScenesTrackingMetric', data_root=data_root,
         ann_file=data_root + 'nuscenes_infos_val.pkl',
         metric=['bbox', 'tracking'], tracking_threshold=0.2,
         modality=dict(use_camera=True, use_lidar=False), backend_args=None),
    dict(type='turbox_mm.SparseDriveMapMetric',
         classes=['ped_crossing', 'divider', 'boundary']),
    dict(type='turbox_mm.SparseDriveMotionMetric'),
    dict(type='turbox_mm.SparseDrivePlanningMetric'),
])
test_evaluator = val_evaluator

train_cfg = dict(max_iters=max_iters, val_interval=checkpoint_interval)
optim_wrapper = dict(optimizer=dict(lr=3e-4),
                     paramwise_cfg=dict(custom_keys={'img_backbone': dict(lr_mult=0.1)}))
param_scheduler = [
    dict(type='LinearLR', start_factor=1.0 / 3, by_epoch=False, begin=0, end=500),
    dict(type='CosineAnnealingLR', T_max=max_iters, eta_min_ratio=1e-3, by_epoch=False,
         begin=0, end=max_iters),
]
default_hooks = dict(checkpoint=dict(interval=checkpoint_interval))
load_from = 'ckpt/sparsedrive_stage1.pth'
