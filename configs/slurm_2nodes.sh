#!/bin/bash
# Diffusion-DPO on two nodes of 8 GPUs each under SLURM: one `accelerate launch` per node, which starts that
# node's 8 processes. Submit with:  sbatch configs/slurm_2nodes.sh
# The authors' SD1.5 batch: 16 GPUs x 1 pair x 128 accumulation steps = 2048 pairs per optimizer step.
# --output_dir must be on storage both nodes see (checkpoints are written by every process).
#SBATCH --job-name=diffusion-dpo
#SBATCH --nodes=2
#SBATCH --ntasks-per-node=1          # one launcher per node; it spawns one process per GPU
#SBATCH --gpus-per-node=8
#SBATCH --cpus-per-task=64
#SBATCH --time=48:00:00
#SBATCH --output=%x-%j.out
#SBATCH --signal=TERM@120            # SIGTERM to every process of the job step 2 minutes before the time limit:
                                     # the trainers stop at the next micro-batch, save a checkpoint and exit

set -euo pipefail
# Node 0 is the rendezvous point; any free port works if every node uses the same one.
export MAIN_PROCESS_IP=$(scontrol show hostnames "$SLURM_JOB_NODELIST" | head -n 1)
export MAIN_PROCESS_PORT=29500
export NUM_PROCESSES=$((SLURM_NNODES * 8))
# torch elastic (inside accelerate launch) SIGKILLs its workers this many seconds after passing SIGTERM on (default
# 30): leave the trainers time to write a checkpoint, within the 120 s SLURM gives before the time limit.
export TORCH_ELASTIC_SHUTDOWN_TIMEOUT=110

# Single quotes: $SLURM_NODEID must be expanded on each node (0 or 1), not once by the batch shell.
srun --kill-on-bad-exit=1 bash -c 'accelerate launch \
  --config_file configs/multi_node_2x8.yaml \
  --num_machines "$SLURM_NNODES" --num_processes "$NUM_PROCESSES" \
  --machine_rank "$SLURM_NODEID" \
  --main_process_ip "$MAIN_PROCESS_IP" --main_process_port "$MAIN_PROCESS_PORT" \
  train_diffusion_dpo.py \
    --pretrained_model_name_or_path stable-diffusion-v1-5/stable-diffusion-v1-5 \
    --dataset_name yuvalkirstain/pickapic_v2 \
    --resolution 512 --train_batch_size 1 --gradient_accumulation_steps 128 \
    --learning_rate 1e-8 --scale_lr --lr_scheduler constant_with_warmup --lr_warmup_steps 500 \
    --beta_dpo 5000 --max_train_steps 2000 --gradient_checkpointing \
    --checkpointing_steps 100 --validation_steps 100 \
    --output_dir /shared/runs/sd15-dpo --resume_from_checkpoint latest'
