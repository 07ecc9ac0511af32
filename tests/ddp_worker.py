"""What the distributed tests run under torchrun: one of the scripts, with World.step wrapped to watch its updates.

    python -m torch.distributed.run --standalone --nproc_per_node=2 tests/ddp_worker.py MODE SCRIPT OUT_FILE ARGS...

MODE 'grads': the updates of the first training step (the optimizer steps skipped, so that every update sees the
starting weights; the teacher perturbed as test_distributed.first_step perturbs it) save, per rank, its per-sample inputs and the gradients after the
all-reduce to OUT_FILE.<rank>, then the run stops. MODE 'nan': rank 1 alone reports NaN losses from its 5th update on.
MODE 'exit': the script runs as it is. In 'nan' and 'exit' each rank prints, once main() has returned or raised,
how many of gloo's threads are left (0: the process group was torn down, so none can abort the exit).
"""
import importlib, os, sys
import torch

class Stop(Exception):
    pass

def main():
    mode, script, out_file, *args = sys.argv[1:]
    sys.path.insert(0, os.path.join(os.path.dirname(os.path.abspath(__file__)), '..'))
    sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))
    from conftest import perturb
    mod = importlib.import_module(script)
    real_step, calls, rank = mod.World.step, [], int(os.environ['RANK'])

    def step(self, opt, loss_fn, *batch, clip=0.0):
        if mode == 'grads' and not calls: perturb(self.teacher)
        if mode == 'grads':
            opt.step = lambda: None                                  # every update sees the starting weights
        logs = real_step(self, opt, loss_fn, *batch, clip=clip)
        calls.append(dict(batch=[None if t is None else t.cpu() for t in batch], logs={k: v.cpu() for k, v in logs.items()},
                          grads=[p.grad.clone() for g in opt.param_groups for p in g['params'] if p.grad is not None]))
        if mode == 'nan' and rank == 1 and len(calls) >= 5:
            logs = {k: v * float('nan') for k, v in logs.items()}
        return logs

    mod.World.step = step
    real_fit = mod.fit

    def fit(cfg, world, nets, opts, step_fn, sampler):
        if mode != 'grads': return real_fit(cfg, world, nets, opts, step_fn, sampler)
        with world.autocast():
            step_fn()                                                # one training step, then stop
        torch.save(calls, f'{out_file}.{rank}')
        raise Stop

    mod.fit = fit
    try:
        mod.main(args)
    except Stop:
        torch.distributed.barrier()                                  # both ranks done with the group before either
        torch.distributed.destroy_process_group()                    # tears it down (fit's own teardown was skipped)
    finally:
        if mode != 'grads':
            names = [open(f'/proc/self/task/{t}/comm').read() for t in os.listdir('/proc/self/task')]
            print(f"rank {rank}: gloo threads left: {sum('gloo' in n for n in names)}", flush=True)

if __name__ == '__main__':
    main()
