"""moeplan's bundled runtime: executes a plan with torch.distributed (NCCL on GPUs, gloo on CPUs) and
measures it. With the probe, the only torch user; it never imports the cost model or the solver, so what
it measures is an independent check of what they predict."""
