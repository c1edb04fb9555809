# stock_ema.py with every turbox component (the turbox twin of the ablation baseline).
_base_ = ['./stock_ema.py', '../../_base_/turbox.py']
