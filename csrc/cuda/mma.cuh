/*
 * mma.cuh - the few tensor-core and async-copy instructions the tiled kernel uses, as inline PTX
 * (sm_80+): cp.async (16-byte global -> shared, zero-filled when out of range), ldmatrix (x4,
 * plain and transposed) and mma.sync m16n8k16 with float32 accumulators for bf16 and fp16.
 *
 * Fragment layouts of m16n8k16 (PTX ISA, "Matrix Fragments for mma.m16n8k16"); g = lane / 4,
 * c = lane % 4:
 *   A (16x16, row): a0a1 = (g, 2c..2c+1), a2a3 = (g+8, 2c..), a4a5 = (g, 2c+8..), a6a7 = (g+8, 2c+8..)
 *   B (16x8, col):  b0b1 = (k = 2c..2c+1, n = g), b2b3 = (k = 2c+8.., n = g)
 *   C (16x8, f32):  c0c1 = (g, 2c..2c+1), c2c3 = (g+8, 2c..2c+1)
 * so two C tiles of scores (keys n0..n0+7, n0+8..n0+15) packed to 16-bit form exactly the A
 * fragment of P for the P.V product over those 16 keys (no shuffle), as in FlashAttention-2.
 */
#ifndef LAMPE_CUDA_MMA_CUH
#define LAMPE_CUDA_MMA_CUH

#include <cuda_bf16.h>
#include <cuda_fp16.h>
#include <stdint.h>

__device__ __forceinline__ uint32_t lcu_smem_addr(const void *p)
{
    return static_cast<uint32_t>(__cvta_generic_to_shared(p));
}

/* 16 bytes global -> shared; src_bytes = 0 writes zeros (rows past the end). */
__device__ __forceinline__ void lcu_cp_async16(void *smem, const void *gmem, int src_bytes)
{
    asm volatile("cp.async.cg.shared.global [%0], [%1], 16, %2;\n" ::"r"(lcu_smem_addr(smem)), "l"(gmem),
                 "r"(src_bytes));
}
__device__ __forceinline__ void lcu_cp_async_commit() { asm volatile("cp.async.commit_group;\n" ::); }
template <int N> __device__ __forceinline__ void lcu_cp_async_wait()
{
    asm volatile("cp.async.wait_group %0;\n" ::"n"(N));
}

__device__ __forceinline__ void lcu_ldmatrix_x4(uint32_t r[4], const void *smem)
{
    asm volatile("ldmatrix.sync.aligned.m8n8.x4.shared.b16 {%0,%1,%2,%3}, [%4];\n"
                 : "=r"(r[0]), "=r"(r[1]), "=r"(r[2]), "=r"(r[3])
                 : "r"(lcu_smem_addr(smem)));
}
__device__ __forceinline__ void lcu_ldmatrix_x4_trans(uint32_t r[4], const void *smem)
{
    asm volatile("ldmatrix.sync.aligned.m8n8.x4.trans.shared.b16 {%0,%1,%2,%3}, [%4];\n"
                 : "=r"(r[0]), "=r"(r[1]), "=r"(r[2]), "=r"(r[3])
                 : "r"(lcu_smem_addr(smem)));
}

template <typename T> struct lcu_mma;
template <> struct lcu_mma<__nv_bfloat16> {
    static __device__ __forceinline__ void run(float c[4], const uint32_t a[4], uint32_t b0, uint32_t b1)
    {
        asm volatile("mma.sync.aligned.m16n8k16.row.col.f32.bf16.bf16.f32 {%0,%1,%2,%3}, {%4,%5,%6,%7}, "
                     "{%8,%9}, {%0,%1,%2,%3};\n"
                     : "+f"(c[0]), "+f"(c[1]), "+f"(c[2]), "+f"(c[3])
                     : "r"(a[0]), "r"(a[1]), "r"(a[2]), "r"(a[3]), "r"(b0), "r"(b1));
    }
};
template <> struct lcu_mma<__half> {
    static __device__ __forceinline__ void run(float c[4], const uint32_t a[4], uint32_t b0, uint32_t b1)
    {
        asm volatile("mma.sync.aligned.m16n8k16.row.col.f32.f16.f16.f32 {%0,%1,%2,%3}, {%4,%5,%6,%7}, "
                     "{%8,%9}, {%0,%1,%2,%3};\n"
                     : "+f"(c[0]), "+f"(c[1]), "+f"(c[2]), "+f"(c[3])
                     : "r"(a[0]), "r"(a[1]), "r"(a[2]), "r"(a[3]), "r"(b0), "r"(b1));
    }
};

#endif
