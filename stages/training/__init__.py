"""Training: the loop shared by pretrain and train, the losses of a batch (objectives), AOQ sampling, SIAM fitting, EMA."""
