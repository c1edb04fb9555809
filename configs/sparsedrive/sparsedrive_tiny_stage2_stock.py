# A tiny SparseDrive stage 2 for CPU tests: the tiny stage-1 model (ResNet-18, 64 features, 32
# det and 8 map anchors, 2 decoder layers, fp32) plus the motion-planning head at 64 features,
# on 64x192 images (the ego feature's 2x6 map at stride 32), batch 2. Everything else is
# stage 2's: the map bank's temporal instances, the instance queue, the targets and losses,
# the hierarchical planner with collision rescoring, and the five evaluations (detection,
# tracking, map, motion, planning).
#
#     python tools/create_data.py synthetic --out data/nuscenes_tiny2 --scenes 3 --frames 8 \
#         --image-size 320x180 --points 4000 --sweeps 0 --val-scenes 1
#     then tools/sparsedrive_anchors.py det (--num 32), map (--num 8), motion and plan
#     (--short pool: a tiny set lacks complete futures of some classes and commands), into
#     data/nuscenes_tiny2/kmeans/ under upstream's file names.
_base_ = ['./sparsedrive_tiny_stage1_stock.py']

data_root = '{{$NUSCENES_ROOT:data/nuscenes_tiny2/}}'
embed_dims = 64
input_shape = (192, 64)  # (W, H)
motion_attention = dict(type='turbox_mm.MultiheadFlashAttention', embed_dims=embed_dims * 2,
                        num_heads=4, batch_first=True, dropout=0.1)

model = dict(
    head=dict(
        task_config=dict(with_motion_plan=True),
        map_head=dict(instance_bank=dict(num_temp_instances=4)),
        motion_plan_head=dict(
            type='turbox_mm.MotionPlanningHead',
            fut_ts=12,
            fut_mode=6,
            ego_fut_ts=6,
            ego_fut_mode=6,
            motion_anchor=data_root + 'kmeans/kmeans_motion_6.npy',
            plan_anchor=data_root + 'kmeans/kmeans_plan_6.npy',
            embed_dims=embed_dims,
            decouple_attn=True,
            instance_queue=dict(type='turbox_mm.InstanceQueue', embed_dims=embed_dims,
                                queue_length=4, tracking_threshold=0.2,
                                feature_map_scale=(64 / 32, 192 / 32)),
            operation_order=['temp_gnn', 'gnn', 'norm', 'cross_gnn', 'norm', 'ffn', 'norm'] * 3
            + ['refine'],
            temp_graph_model=dict(type='MultiheadAttention', embed_dims=embed_dims * 2,
                                  num_heads=4, batch_first=True, dropout=0.1),
            graph_model=motion_attention,
            cross_graph_model=dict(motion_attention, embed_dims=embed_dims),
            norm_layer=dict(type='LN', normalized_shape=embed_dims),
            ffn=dict(type='turbox_mm.AsymmetricFFN', in_channels=embed_dims, pre_norm=True,
                     embed_dims=embed_dims, feedforward_channels=embed_dims * 2, num_fcs=2,
                     ffn_drop=0.1, act_cfg=dict(type='ReLU', inplace=True),
                     identity_by_hidden=True),
            refine_layer=dict(type='turbox_mm.MotionPlanningRefinementModule',
                              embed_dims=embed_dims, fut_ts=12, fut_mode=6, ego_fut_ts=6,
                              ego_fut_mode=6),
            motion_sampler=dict(type='turbox_mm.MotionTarget'),
            motion_loss_cls=dict(type='mmdet.FocalLoss', use_sigmoid=True, gamma=2.0,
                                 alpha=0.25, loss_weight=0.2),
            motion_loss_reg=dict(type='mmdet.L1Loss', loss_weight=0.2),
            planning_sampler=dict(type='turbox_mm.PlanningTarget', ego_fut_ts=6,
                                  ego_fut_mode=6),
            plan_loss_cls=dict(type='mmdet.FocalLoss', use_sigmoid=True, gamma=2.0,
                               alpha=0.25, loss_weight=0.5),
            plan_loss_reg=dict(type='mmdet.L1Loss', loss_weight=1.0),
            plan_loss_status=dict(type='mmdet.L1Loss', loss_weight=1.0),
            motion_decoder=dict(type='turbox_mm.SparseBox3DMotionDecoder', num_output=16),
            planning_decoder=dict(type='turbox_mm.HierarchicalPlanningDecoder', ego_fut_ts=6,
                                  ego_fut_mode=6, use_rescore=True),
            num_det=8,
            num_map=4)))

data_aug_conf = dict(resize_lim=(0.61, 0.67), final_dim=input_shape[::-1],
                     bot_pct_lim=(0.0, 0.0), rot_lim=(-5.4, 5.4), H=180, W=320,
                     rand_flip=True, rot3d_range=[0, 0])
train_dataloader = dict(dataset=dict(data_root=data_root, data_aug_conf=data_aug_conf))
val_dataloader = dict(dataset=dict(data_root=data_root, data_aug_conf=data_aug_conf,
                                   with_fut_boxes=True))
test_dataloader = val_dataloader
val_evaluator = dict(metrics=[
    dict(type='turbox_mm.NuScenesTrackingMetric', data_root=data_root,
         ann_file=data_root + 'nuscenes_infos_val.pkl', metric=['bbox', 'tracking'],
         tracking_threshold=0.0, modality=dict(use_camera=True, use_lidar=False),
         backend_args=None),
    dict(type='turbox_mm.SparseDriveMapMetric',
         classes=['ped_crossing', 'divider', 'boundary']),
    dict(type='turbox_mm.SparseDriveMotionMetric'),
    dict(type='turbox_mm.SparseDrivePlanningMetric'),
])
test_evaluator = val_evaluator
