# Megatron-LM arguments for the moeplan plan of 2x70B on a800-2x8, 16 GPUs (moeplan 0.1.0).
# Target: Megatron-Core 0.16. Append data, tokenizer and learning-rate flags:
#   torchrun <launcher flags> pretrain_gpt.py "${MEGATRON_ARGS[@]}" <data/tokenizer/learning-rate flags>
# Vocabulary 32000 comes from the tokenizer; for synthetic runs add --mock-data
#   --tokenizer-type NullTokenizer --vocab-size 31999 (NullTokenizer adds an EOD token).
# Not stated by the model, so Megatron-LM's defaults train: norm epsilon (Megatron-LM's 1e-5); rotary base (Megatron-LM's 10000); load-balancing type (Megatron-LM's aux_loss); load-balancing coefficient (Megatron-LM's 0.0: nothing is balanced).
# Needs Transformer Engine 2.8 or later: validate_args refuses --delay-wgrad-compute with --overlap-grad-reduce (arguments.py:1176 at core_v0.15.0) on an older one.
export PYTORCH_CUDA_ALLOC_CONF=expandable_segments:True
export NCCL_NVLS_ENABLE=0
export OMP_NUM_THREADS=$(( $(nproc) / 8 ))
MEGATRON_ARGS=(
    --num-layers 80
    --hidden-size 8192
    --ffn-hidden-size 28672
    --num-attention-heads 64
    --group-query-attention
    --num-query-groups 8
    --kv-channels 128
    --normalization RMSNorm
    --position-embedding-type rope
    --disable-bias-linear
    --swiglu
    --untie-embeddings-and-output-weights
    --attention-dropout 0.0
    --hidden-dropout 0.0
    --seq-length 4096
    --max-position-embeddings 4096
    --num-experts 2
    --moe-ffn-hidden-size 28672
    --moe-router-topk 1
    --moe-router-score-function softmax
    --moe-router-pre-softmax
    --moe-grouped-gemm
    --moe-permute-fusion
    --moe-router-dtype fp32
    --moe-router-fusion
    --moe-token-dispatcher-type alltoall
    --overlap-moe-expert-parallel-comm
    --delay-wgrad-compute
    --tensor-model-parallel-size 4
    --pipeline-model-parallel-size 2
    --num-virtual-stages-per-pipeline-rank 8
    --context-parallel-size 1
    --expert-model-parallel-size 2
    --expert-tensor-parallel-size 4
    --sequence-parallel
    --use-distributed-optimizer
    --overlap-grad-reduce
    --overlap-param-gather
    --micro-batch-size 1
    --global-batch-size 1024
    --bf16
    --use-precision-aware-optimizer
    --optimizer-cpu-offload
    --optimizer-offload-fraction 1
    --overlap-cpu-optimizer-d2h-h2d
)
