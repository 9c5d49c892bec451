// Baseline for benchmarks only: a stand-in for the authors' public code (ruosongwang/CNTK, CNTK.py), rewritten
// here. One image pair at a time, two full SIDE^4 float32 tensors per pair (Sigma and Theta, entry
// e = ((i * SIDE + j) * SIDE + i') * SIDE + j'), updated in place by two kernels with the authors' launch shapes:
//
//   base_box         tr_D of one tensor, in place   grid (2 SIDE - 1, 2 SIDE - 1), block (SIDE, SIDE)
//   base_relu_theta  ReLU expectations and the Theta update fused, in place   grid (SIDE, SIDE, (SIDE / 8)^2),
//                    block (8, 8)
//
// The host side (products by GEMM, zeroing, readout by a library reduction, the layer loop) is
// baseline_pair() in benchmarks/bench_gpu.py. workers/gpu.py never loads this file.
// BASE_SIDE (default 32, a multiple of 8) exists only so that tests can run the kernels on small images on the host.
// Self-contained (no headers) so NVRTC and nvcc both compile it.

#ifndef BASE_SIDE
#define BASE_SIDE 32
#endif
#define SIDE BASE_SIDE
#define PI_F 3.14159265358979f

// tr_D in place: t[i,j,i',j'] <- sum_{a,b in -1..1} t[i+a, j+b, i'+a, j'+b], zero outside the image.
// tr_D never mixes entries of different displacement (i - i', j - j'), so CUDA block (u, v) owns the plane
// i - i' = u - (SIDE - 1), j - j' = v - (SIDE - 1), indexed by (i', j') = (threadIdx.x, threadIdx.y), where tr_D
// is a 3 x 3 box sum over a zero-padded shared copy. Threads outside the image only pad. Blocks own disjoint
// entries, and every thread reads its entry before the barrier and writes it after, so in place is safe.
// Consecutive lanes differ in i and i' (the authors' mapping): every global access is a 4-byte scatter.
extern "C" __global__ void base_box(float* __restrict__ t)
{
    __shared__ float plane[SIDE + 2][SIDE + 2];
    const int ip = threadIdx.x, jp = threadIdx.y;
    const int i = ip + (int)blockIdx.x - (SIDE - 1), j = jp + (int)blockIdx.y - (SIDE - 1);
    const bool inside = i >= 0 && i < SIDE && j >= 0 && j < SIDE;
    const int e = ((i * SIDE + j) * SIDE + ip) * SIDE + jp;
    plane[ip + 1][jp + 1] = inside ? t[e] : 0.f;
    if (ip == 0) plane[0][jp + 1] = plane[SIDE + 1][jp + 1] = 0.f;
    if (jp == 0) plane[ip + 1][0] = plane[ip + 1][SIDE + 1] = 0.f;
    if (ip == 0 && jp == 0) plane[0][0] = plane[0][SIDE + 1] = plane[SIDE + 1][0] = plane[SIDE + 1][SIDE + 1] = 0.f;
    __syncthreads();
    if (!inside) return;
    float s = 0.f;
    for (int a = 0; a < 3; ++a)
        for (int b = 0; b < 3; ++b) s += plane[ip + a][jp + b];
    t[e] = s;
}

// One layer on every entry, in place: from Sigma = sigma[e] and the per-pixel normalisers of x (root_x = sqrt(d),
// inv_x = 1/sqrt(d) or 0 where d = 0, at (i, j)) and of y (at (i', j')), each SIDE x SIDE float32:
//   rho = clamp(Sigma inv_x inv_y, -1, 1) (1 on i = i', j = j' when same != 0: x and y are the same image)
//   K = root_x root_y (rho (pi - acos rho) + sqrt(1 - rho^2)) / (9 pi),  Kdot = (pi - acos rho) / (9 pi)
//   theta[e] <- Kdot theta[e] + K,  sigma[e] <- K.
// CUDA block (i, j, z) covers i' = threadIdx.x + 8 (z / (SIDE / 8)), j' = threadIdx.y + 8 (z % (SIDE / 8)).
extern "C" __global__ void base_relu_theta(float* __restrict__ sigma, float* __restrict__ theta,
                                           const float* __restrict__ root_x, const float* __restrict__ root_y,
                                           const float* __restrict__ inv_x, const float* __restrict__ inv_y, int same)
{
    const int tiles = SIDE / 8;
    const int i = blockIdx.x, j = blockIdx.y;
    const int ip = threadIdx.x + 8 * ((int)blockIdx.z / tiles), jp = threadIdx.y + 8 * ((int)blockIdx.z % tiles);
    const int e = ((i * SIDE + j) * SIDE + ip) * SIDE + jp;
    const int px = i * SIDE + j, py = ip * SIDE + jp;
    float rho = fminf(fmaxf(sigma[e] * inv_x[px] * inv_y[py], -1.f), 1.f);
    if (same && px == py) rho = 1.f;
    const float gap = PI_F - acosf(rho);
    const float k = (rho * gap + sqrtf(fmaxf(1.f - rho * rho, 0.f))) * root_x[px] * root_y[py] / (9.f * PI_F);
    // float64 division on purpose: the authors' Kdot line divides by a double constant, costing an FP64 divide
    // per entry; kept so that this stand-in does not run faster than their kernel.
    const float kdot = (float)((double)gap / (9.0 * 3.14159265358979323846));
    theta[e] = theta[e] * kdot + k;
    sigma[e] = k;
}
