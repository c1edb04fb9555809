# MapTR v2, ResNet-50, 6 cameras at 1600x900 (scaled by 0.5, padded to 800x480), an LSS BEV
# encoder with depth supervision, a 200x100 BEV over 30 m x 60 m, 50 one-to-one + 300
# one-to-many vectors x 20 points, decoupled self-attention, auxiliary BEV and perspective
# segmentation, 24 epochs, 4 samples per GPU on nuScenes: upstream's training setting
# (hustvl/MapTR projects/configs/maptrv2/maptrv2_nusc_r50_24ep.py @ 69ab751) on mmengine /
# mmdet3d 1.4, with stock components and stock ops. docs/design/maptr.md lists every value
# and its source.
#
# Layout against upstream: our MapTRv2Head owns only the decoder of upstream's
# `pts_bbox_head.transformer`; the LSS encoder (upstream's `transformer.encoder`) is the
# detector's `bev_encoder`. Upstream's transformer also builds a can-bus MLP and camera / level
# embeddings that feed nothing with an LSS encoder (hence its find_unused_parameters); they
# are not built here.
#
# The pooling of the LSS encoder: upstream compiles BEVFusion's bev_pool CUDA op, which no
# package ships; the stock pooling here is the PyTorch procedure (`bev_pool_impl='stock'`).
# The like-for-like benchmark row sets `model.bev_encoder.bev_pool_impl=turbox` (turbox_mm's
# op) in the stock config.
#
# Data: nuScenes v2 infos with `can_bus`, `scene_token` and `map_location` (the synthetic
# generator writes them; for real data: tools/create_data.py map-fields) and the map
# expansion under $NUSCENES_ROOT/maps/expansion/, and the map ground truth precomputed into
# the infos (`map_annotation`: tools/create_data.py map-gt, after `synthetic` too), as
# upstream's v2 reads it precomputed from its infos.
# The backbone starts from torchvision's ImageNet ResNet-50 file upstream names
# (ckpts/resnet50-19c8e357.pth); tests switch it off (init_cfg=None).
default_scope = 'mmdet3d'

data_root = '{{$NUSCENES_ROOT:data/nuscenes/}}'
point_cloud_range = [-15.0, -30.0, -10.0, 15.0, 30.0, 10.0]
voxel_size = [0.15, 0.15, 20.0]
dbound = [1.0, 35.0, 0.5]
# upstream marks x, y and z as unused (the LSS grid comes from pc_range and voxel_size)
grid_config = dict(x=[-30.0, -30.0, 0.15], y=[-15.0, -15.0, 0.15], z=[-10, 10, 20],
                   depth=[1.0, 35.0, 0.5])
img_norm_cfg = dict(mean=[123.675, 116.28, 103.53], std=[58.395, 57.12, 57.375], to_rgb=True)
class_names = ['car', 'truck', 'construction_vehicle', 'bus', 'trailer', 'barrier',
               'motorcycle', 'bicycle', 'pedestrian', 'traffic_cone']
map_classes = ['divider', 'ped_crossing', 'boundary']
num_vec = 50
fixed_ptsnum_per_gt_line = 20
fixed_ptsnum_per_pred_line = 20
eval_use_same_gt_sample_num_flag = True
num_map_classes = len(map_classes)
input_modality = dict(use_lidar=True, use_camera=True, use_radar=False, use_map=False,
                      use_external=True)  # lidar: the depth targets
_dim_ = 256
_pos_dim_ = _dim_ // 2
_ffn_dim_ = _dim_ * 2
_num_levels_ = 1
bev_h_ = 200
bev_w_ = 100
queue_length = 1  # one frame: no temporal input
aux_seg_cfg = dict(use_aux_seg=True, bev_seg=True, pv_seg=True, seg_classes=1,
                   feat_down_sample=32, pv_thickness=1)
batch_size = 4
num_epochs = 24

model = dict(
    type='turbox_mm.MapTRv2',
    # Images come normalised and padded from the pipeline (upstream normalises on the CPU).
    data_preprocessor=dict(type='Det3DDataPreprocessor'),
    use_grid_mask=True,
    video_test_mode=False,
    img_backbone=dict(
        type='mmdet.ResNet', depth=50, num_stages=4, out_indices=(3, ), frozen_stages=1,
        norm_cfg=dict(type='BN', requires_grad=False), norm_eval=True, style='pytorch',
        init_cfg=dict(type='Pretrained', checkpoint='ckpts/resnet50-19c8e357.pth')),
    img_neck=dict(
        type='mmdet.FPN', in_channels=[2048], out_channels=_dim_, start_level=0,
        add_extra_convs='on_output', num_outs=_num_levels_, relu_before_extra_convs=True),
    # upstream's pts_bbox_head.transformer.encoder
    bev_encoder=dict(
        type='turbox_mm.LSSTransform', in_channels=_dim_, out_channels=_dim_,
        feat_down_sample=32, pc_range=point_cloud_range, voxel_size=voxel_size,
        dbound=dbound, downsample=2, loss_depth_weight=3.0,
        depthnet_cfg=dict(use_dcn=False, with_cp=False, aspp_mid_channels=96),
        grid_config=grid_config),
    pts_bbox_head=dict(
        type='turbox_mm.MapTRv2Head',
        bev_h=bev_h_, bev_w=bev_w_, num_query=900, num_vec_one2one=num_vec,
        num_vec_one2many=300, k_one2many=6, num_pts_per_vec=fixed_ptsnum_per_pred_line,
        num_pts_per_gt_vec=fixed_ptsnum_per_gt_line, dir_interval=1,
        query_embed_type='instance_pts', transform_method='minmax',
        gt_shift_pts_pattern='v2', num_classes=num_map_classes, in_channels=_dim_,
        embed_dims=_dim_, sync_cls_avg_factor=True, with_box_refine=True, as_two_stage=False,
        code_size=2, code_weights=[1.0, 1.0, 1.0, 1.0], aux_seg=aux_seg_cfg,
        # upstream's transformer.decoder: 6 x (MHA across vectors, norm, MHA within a vector,
        # norm, CustomMSDeformableAttention 1 level, norm, FFN 512 dropout 0.1, norm)
        decoder=dict(
            type='turbox_mm.MapTRDecoder', num_layers=6, return_intermediate=True,
            layer_cfg=dict(
                type='turbox_mm.DecoupledMapTRDecoderLayer',
                self_attn_cfg=dict(embed_dims=_dim_, num_heads=8, dropout=0.1),
                cross_attn_cfg=dict(embed_dims=_dim_, num_heads=8, num_levels=1,
                                    num_points=4, dropout=0.1),
                ffn_cfg=dict(embed_dims=_dim_, feedforward_channels=_ffn_dim_, num_fcs=2,
                             ffn_drop=0.1, act_cfg=dict(type='ReLU', inplace=True)))),
        bbox_coder=dict(
            type='turbox_mm.MapTRNMSFreeCoder',
            post_center_range=[-20, -35, -20, -35, 20, 35, 20, 35],
            pc_range=point_cloud_range, max_num=50, voxel_size=voxel_size,
            num_classes=num_map_classes),
        loss_cls=dict(type='mmdet.FocalLoss', use_sigmoid=True, gamma=2.0, alpha=0.25,
                      loss_weight=2.0),
        loss_bbox=dict(type='mmdet.L1Loss', loss_weight=0.0),
        loss_iou=dict(type='mmdet.GIoULoss', loss_weight=0.0),
        loss_pts=dict(type='turbox_mm.PtsL1Loss', loss_weight=5.0),
        loss_dir=dict(type='turbox_mm.PtsDirCosLoss', loss_weight=0.005),
        loss_seg=dict(type='turbox_mm.SimpleLoss', pos_weight=4.0, loss_weight=1.0),
        loss_pv_seg=dict(type='turbox_mm.SimpleLoss', pos_weight=1.0, loss_weight=2.0)),
    train_cfg=dict(pts=dict(
        grid_size=[512, 512, 1], voxel_size=voxel_size, point_cloud_range=point_cloud_range,
        out_size_factor=4,
        assigner=dict(
            type='turbox_mm.MapTRAssigner',
            cls_cost=dict(type='mmdet.FocalLossCost', weight=2.0),
            reg_cost=dict(type='mmdet.BBoxL1Cost', weight=0.0, box_format='xywh'),
            iou_cost=dict(type='mmdet.IoUCost', iou_mode='giou', weight=0.0),
            pts_cost=dict(type='turbox_mm.OrderedPtsL1Cost', weight=5),
            pc_range=point_cloud_range))))

# -- data -------------------------------------------------------------------------------------
cameras = ['CAM_FRONT', 'CAM_FRONT_RIGHT', 'CAM_FRONT_LEFT', 'CAM_BACK', 'CAM_BACK_LEFT',
           'CAM_BACK_RIGHT']
data_prefix = dict(pts='samples/LIDAR_TOP', **{cam: f'samples/{cam}' for cam in cameras})
# Upstream's v2 reads the map ground truth precomputed in its infos (`annotation`, written by
# tools/maptrv2/custom_nusc_map_converter.py with the same geometry code as v1's online cut):
# 'precomputed' reads the reference's polylines that tools/create_data.py map-gt stored in
# each sample (`map_annotation`; the same outputs as impl='reference' bit for bit), and a
# sample without them is a KeyError naming the command.
map_gt = dict(type='turbox_mm.LoadMapGT', data_root=data_root, impl='precomputed',
              patch_size=(point_cloud_range[4] - point_cloud_range[1],
                          point_cloud_range[3] - point_cloud_range[0]),
              map_classes=map_classes, fixed_num=fixed_ptsnum_per_gt_line,
              padding_value=-10000)
image_loader = dict(type='LoadMultiViewImageFromFiles', to_float32=True,
                    num_views=len(cameras))
# upstream's dataset adds the map ground truth and the segmentation masks after its pipeline
# (vectormap_pipeline); LoadMapGT and RasterizeMapGT do it here, after the padding
train_pipeline = [
    dict(type='turbox_mm.NuScenesMapTRAdaptor'),
    image_loader,
    dict(type='turbox_mm.RandomScaleImageMultiViewImage', scales=[0.5]),
    dict(type='turbox_mm.PhotoMetricDistortionMultiViewImage'),
    dict(type='turbox_mm.NormalizeMultiviewImage', **img_norm_cfg),
    dict(type='LoadPointsFromFile', coord_type='LIDAR', load_dim=5, use_dim=5),
    dict(type='turbox_mm.PointToMultiViewDepth', downsample=1, grid_config=grid_config),
    dict(type='turbox_mm.PadMultiViewImageDepth', size_divisor=32),
    # upstream's filter_empty_gt: a training sample without map elements is replaced by
    # another (mmengine's dataset re-draws when the pipeline returns None)
    dict(map_gt, drop_empty=True),
    dict(type='turbox_mm.RasterizeMapGT', bev_size=(bev_h_, bev_w_),
         patch_size=(point_cloud_range[4] - point_cloud_range[1],
                     point_cloud_range[3] - point_cloud_range[0]), **aux_seg_cfg),
    dict(type='turbox_mm.PackMapTRInputs',
         keys=['img', 'gt_depth', 'gt_map_labels', 'gt_map_shifts', 'gt_map_bboxes',
               'gt_map_pts', 'gt_map_bev_seg', 'gt_map_pv_seg']),
]
# upstream wraps the padding in MultiScaleFlipAug3D((1600, 900), flip=False): one scale, no
# flip, so the plain transform here. LoadMapGT puts the ground truth in eval_ann_info for
# MapChamferMetric.
test_pipeline = [
    dict(type='turbox_mm.NuScenesMapTRAdaptor'),
    image_loader,
    dict(type='turbox_mm.RandomScaleImageMultiViewImage', scales=[0.5]),
    dict(type='turbox_mm.NormalizeMultiviewImage', **img_norm_cfg),
    dict(type='turbox_mm.PadMultiViewImage', size_divisor=32),
    map_gt,
    dict(type='turbox_mm.PackMapTRInputs', keys=['img']),
]
dataset_common = dict(
    type='NuScenesDataset', data_root=data_root, data_prefix=data_prefix,
    metainfo=dict(classes=class_names), modality=input_modality, box_type_3d='LiDAR',
    use_valid_flag=True, backend_args=None)
train_dataloader = dict(
    batch_size=batch_size,
    num_workers=4,
    persistent_workers=True,
    sampler=dict(type='DefaultSampler', shuffle=True),
    # samples without boxes are kept (upstream filters on the map: LoadMapGT's drop_empty)
    dataset=dict(dataset_common, ann_file='nuscenes_infos_train.pkl', pipeline=train_pipeline,
                 test_mode=False, filter_empty_gt=False))
val_dataloader = dict(
    batch_size=1,
    num_workers=4,
    persistent_workers=True,
    drop_last=False,
    sampler=dict(type='DefaultSampler', shuffle=False),
    dataset=dict(dataset_common, ann_file='nuscenes_infos_val.pkl', pipeline=test_pipeline,
                 test_mode=True))
test_dataloader = val_dataloader
val_evaluator = dict(type='turbox_mm.MapChamferMetric', classes=map_classes,
                     resample_predictions=eval_use_same_gt_sample_num_flag)
test_evaluator = val_evaluator

# -- schedule ---------------------------------------------------------------------------------
train_cfg = dict(type='EpochBasedTrainLoop', max_epochs=num_epochs, val_interval=2)
val_cfg = dict(type='ValLoop')
test_cfg = dict(type='TestLoop')
# Upstream: fp16 = dict(loss_scale=512.), AdamW 6e-4 with the backbone at 0.1x, weight decay
# 0.01 on every parameter, L2 clipping at 35.
optim_wrapper = dict(
    type='AmpOptimWrapper',
    loss_scale=512.0,
    optimizer=dict(type='AdamW', lr=6e-4, weight_decay=0.01),
    paramwise_cfg=dict(custom_keys={'img_backbone': dict(lr_mult=0.1)}),
    clip_grad=dict(max_norm=35, norm_type=2))
# mmcv's CosineAnnealing (by epoch, min_lr_ratio 1e-3) under a linear warm-up of 500
# iterations from 1/3
param_scheduler = [
    dict(type='LinearLR', start_factor=1.0 / 3, by_epoch=False, begin=0, end=500),
    dict(type='CosineAnnealingLR', T_max=num_epochs, eta_min_ratio=1e-3, by_epoch=True,
         begin=0, end=num_epochs),
]

default_hooks = dict(
    timer=dict(type='IterTimerHook'),
    logger=dict(type='LoggerHook', interval=50),
    param_scheduler=dict(type='ParamSchedulerHook'),
    # upstream: every 2 epochs, keep 1, and the best Chamfer mAP
    checkpoint=dict(type='CheckpointHook', interval=2, max_keep_ckpts=1,
                    save_best='NuscMap_chamfer/mAP', rule='greater'),
    sampler_seed=dict(type='DistSamplerSeedHook'))
env_cfg = dict(
    cudnn_benchmark=False,
    mp_cfg=dict(mp_start_method='fork', opencv_num_threads=0),
    dist_cfg=dict(backend='nccl'))
# upstream's find_unused_parameters=True (it has parameters that feed nothing: the can-bus MLP
# and embeddings not built here); kept, so that stock costs what upstream's runs cost
model_wrapper_cfg = dict(type='MMDistributedDataParallel', find_unused_parameters=True)
log_processor = dict(type='LogProcessor', window_size=50, by_epoch=True)
log_level = 'INFO'
load_from = None
resume = False
