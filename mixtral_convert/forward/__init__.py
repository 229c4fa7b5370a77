"""Running the model: the reference forward (`reference`), the same model run as N
tensor-parallel ranks (`sharded`, in one process; `distributed`, over torch.distributed), the
job and its inputs (`job`, `inputs`), opening a checkpoint to run (`run`), and the numerical
comparison of the two (`parity`)."""
