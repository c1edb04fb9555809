# turbox_all.py without one component: its effect is the difference between the two.
_base_ = ['./turbox_all.py']

turbox = dict(system=dict(cpu_affinity=False, gc=False, huge_pages=False))
