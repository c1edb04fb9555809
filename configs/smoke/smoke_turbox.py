_base_ = ['./smoke_stock.py', '../_base_/turbox.py']
