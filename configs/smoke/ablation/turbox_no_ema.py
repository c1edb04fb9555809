# turbox_all.py without one component: its effect is the difference between the two.
_base_ = ['./turbox_all.py']

turbox = dict(ema=dict(graph=False))
