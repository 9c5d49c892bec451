// Baseline for benchmarks only: the scheme of the paper's Appendix I (and its public code). One image pair at a
// time, full 32^4 float32 tensors T[i][j][i'][j'] in global memory, one kernel launch per operation and layer.
// benchmarks/bench_gpu.py drives it; workers/gpu.py never loads it.
//
// Tensors are float32 arrays of 32^4 entries, entry e = ((i * 32 + j) * 32 + i') * 32 + j'. Element-wise kernels
// take grid ceil(32^4 / 256) blocks of 256 threads. The normalisers come from diag_maps of cntk_tile.cu (float2
// {1/sqrt(d), sqrt(d) / (3 sqrt(pi))} per pixel, (layers, 64, 32) per image; rows 0..31 are used here).
// No compile-time options. Self-contained (no headers) so NVRTC and nvcc both compile it.

#define SIDE 32
#define CHANNELS 3
#define ENTRIES (SIDE * SIDE * SIDE * SIDE)
#define PI_F 3.14159265358979f

__device__ __forceinline__ void unpack(int e, int& i, int& j, int& ip, int& jp)
{
    jp = e % SIDE; e /= SIDE;
    ip = e % SIDE; e /= SIDE;
    j = e % SIDE;
    i = e / SIDE;
}

// out[i,j,i',j'] = sum_c x[i,j,c] y[i',j',c]; x, y: (32, 32, 3) float32.
extern "C" __global__ void base_products(const float* __restrict__ x, const float* __restrict__ y,
                                         float* __restrict__ out)
{
    const int e = blockIdx.x * blockDim.x + threadIdx.x;
    if (e >= ENTRIES) return;
    int i, j, ip, jp;
    unpack(e, i, j, ip, jp);
    float s = 0.f;
    for (int c = 0; c < CHANNELS; ++c) s += x[(i * SIDE + j) * CHANNELS + c] * y[(ip * SIDE + jp) * CHANNELS + c];
    out[e] = s;
}

// tr_D: out[i,j,i',j'] = sum_{a,b in -1..1} in[i+a, j+b, i'+a, j'+b], zero outside the image.
extern "C" __global__ void base_trace_d(const float* __restrict__ in, float* __restrict__ out)
{
    const int e = blockIdx.x * blockDim.x + threadIdx.x;
    if (e >= ENTRIES) return;
    int i, j, ip, jp;
    unpack(e, i, j, ip, jp);
    float s = 0.f;
    for (int a = -1; a <= 1; ++a) {
        if (i + a < 0 || i + a >= SIDE || ip + a < 0 || ip + a >= SIDE) continue;
        for (int b = -1; b <= 1; ++b) {
            if (j + b < 0 || j + b >= SIDE || jp + b < 0 || jp + b >= SIDE) continue;
            s += in[(((i + a) * SIDE + j + b) * SIDE + ip + a) * SIDE + jp + b];
        }
    }
    out[e] = s;
}

// K and Kdot of one layer from Sigma and the layer's maps of x (x_map) and y (y_map), each (32 rows used) x 32.
// rho_one_on_diagonal = 1 sets rho = 1 where i = i', j = j' (x and y are the same image).
extern "C" __global__ void base_relu(const float* __restrict__ sigma, const float2* __restrict__ x_map,
                                     const float2* __restrict__ y_map, int rho_one_on_diagonal,
                                     float* __restrict__ k, float* __restrict__ kdot)
{
    const int e = blockIdx.x * blockDim.x + threadIdx.x;
    if (e >= ENTRIES) return;
    int i, j, ip, jp;
    unpack(e, i, j, ip, jp);
    const float2 nx = x_map[i * SIDE + j], ny = y_map[ip * SIDE + jp];
    float rho = fminf(fmaxf(sigma[e] * nx.x * ny.x, -1.f), 1.f);
    if (rho_one_on_diagonal && i == ip && j == jp) rho = 1.f;
    const float theta = acosf(rho);
    // (2/9) sqrt(s s') (rho (pi - theta) + sqrt(1 - rho^2)) / (2 pi); g g' = sqrt(s s') / (9 pi)
    const float root_ss = nx.y * ny.y * 9.f * PI_F;
    k[e] = (2.f / 9.f) * root_ss * (rho * (PI_F - theta) + sqrtf(fmaxf(1.f - rho * rho, 0.f))) / (2.f * PI_F);
    kdot[e] = (2.f / 9.f) * (PI_F - theta) / (2.f * PI_F);
}

// out = kdot * theta + k (with_k = 1) or kdot * theta (with_k = 0).
extern "C" __global__ void base_theta(const float* __restrict__ kdot, const float* __restrict__ theta,
                                      const float* __restrict__ k, int with_k, float* __restrict__ out)
{
    const int e = blockIdx.x * blockDim.x + threadIdx.x;
    if (e >= ENTRIES) return;
    out[e] = kdot[e] * theta[e] + (with_k ? k[e] : 0.f);
}

// total += sum of in over all entries (diagonal_only = 0) or over i = i', j = j' (diagonal_only = 1).
// total: one float64, zeroed by the caller. 256 threads per block.
extern "C" __global__ void base_sum(const float* __restrict__ in, int diagonal_only, double* __restrict__ total)
{
    __shared__ double partial[256];
    const int e = blockIdx.x * blockDim.x + threadIdx.x;
    double v = 0.0;
    if (e < ENTRIES) {
        int i, j, ip, jp;
        unpack(e, i, j, ip, jp);
        if (!diagonal_only || (i == ip && j == jp)) v = in[e];
    }
    partial[threadIdx.x] = v;
    __syncthreads();
    for (int stride = blockDim.x / 2; stride > 0; stride /= 2) {
        if (threadIdx.x < stride) partial[threadIdx.x] += partial[threadIdx.x + stride];
        __syncthreads();
    }
    if (threadIdx.x == 0) atomicAdd(total, partial[0]);
}
