// Fused CNTK tile kernels (Arora et al. 2019; formulas in docs/gpu.md and the math notes).
//
// Images are P x Q x C (IMAGE_ROWS x IMAGE_COLS x CHANNELS, compile-time; 32x32x3 by default), float32, NHWC. A warp
// owns one circular displacement block (ci, cj) of one image pair: lane j holds column j, register i holds row i, so
// entry (i, j) pairs x at (i, j) with y at ((i + ci) % P, (j + cj) % Q). Sigma and Theta of the block stay in
// registers for every layer; the 3x3 box sum (tr_D) runs along registers for rows and through warp shuffles for
// columns, zero padded at the image edges and across the cut lines i = P - ci, j = Q - cj. Per layer, only the two
// per-image diagonal maps are read and one float64 sum per CUDA block and kind is written (GAP: atomicAdd; vanilla:
// one warp per pair, plain stores). With Q < 32 the lanes j >= Q hold no column: they shadow column Q - 1 (so their
// values stay finite), have no neighbours and add nothing to any sum.
//
// Compile-time options (-D), all optional; the launcher (workers/gpu.py) passes the same ones:
//   IMAGE_ROWS, IMAGE_COLS, CHANNELS  image height P, width Q (1..32 each: rows are registers, columns are lanes) and
//                    channel count C (1..32); default 32, 32, 3. The launcher builds one module per image shape.
//   WARPS_PER_BLOCK  warps per CUDA block (default 8).
//   BLOCKS_PER_WARP  displacement blocks each warp of the GAP kernel runs in turn (default 1; more blocks per warp
//                    make ptxas hold far more registers); a pair has 1024 / (WARPS_PER_BLOCK * BLOCKS_PER_WARP)
//                    CUDA blocks.
//   MIN_BLOCKS_PER_SM second __launch_bounds__ argument of the tile kernels (default 2): caps registers per thread.
//   MAX_LAYERS       largest number of conv layers L = max_depth - 1 (default 32); sizes the shared accumulators.
//   LAP_COUNT        number of LAP(c) readouts the GAP kernel adds (default 0, at most 8; docs/enhanced.md). With 0
//                    the module is the plain one, instruction for instruction. With k > 0 cntk_gap_tile takes one
//                    more argument, lap_table, and writes GAP_SLOTS = 2 (1 + k) sums per pair and layer; the same
//                    build's scatter_pairs reads that layout (the launcher runs vanilla from the plain build).
//
// Self-contained on purpose (no CUDA or CuPy headers): NVRTC through cupy.RawModule and nvcc both compile it.

#ifndef WARPS_PER_BLOCK
#define WARPS_PER_BLOCK 8
#endif
#ifndef BLOCKS_PER_WARP
#define BLOCKS_PER_WARP 1
#endif
#ifndef MIN_BLOCKS_PER_SM
#define MIN_BLOCKS_PER_SM 2
#endif
#ifndef MAX_LAYERS
#define MAX_LAYERS 32
#endif
#ifndef LAP_COUNT
#define LAP_COUNT 0
#endif
#ifndef IMAGE_ROWS
#define IMAGE_ROWS 32
#endif
#ifndef IMAGE_COLS
#define IMAGE_COLS 32
#endif
#ifndef CHANNELS
#define CHANNELS 3
#endif

#define MAX_SIDE 32                       // rows are registers and columns are the lanes of one warp
#define MAX_CHANNELS 32
#if IMAGE_ROWS < 1 || IMAGE_ROWS > MAX_SIDE || IMAGE_COLS < 1 || IMAGE_COLS > MAX_SIDE
#error "IMAGE_ROWS and IMAGE_COLS must be 1..32 (rows are registers, columns are the lanes of one warp)"
#endif
#if CHANNELS < 1 || CHANNELS > MAX_CHANNELS
#error "CHANNELS must be 1..32"
#endif
#if IMAGE_ROWS == IMAGE_COLS
#define SIDE IMAGE_ROWS                   // square images only: host tools size their launches with SIDE * SIDE
#endif
#define PIXELS (IMAGE_ROWS * IMAGE_COLS)  // also the number of displacement blocks of a pair
#define IMAGE_FLOATS (PIXELS * CHANNELS)
#define MAP_ROWS (2 * IMAGE_ROWS)         // diagonal maps repeat their P rows so row (i + ci) needs no modulo
#define MAP_ENTRIES (MAP_ROWS * IMAGE_COLS)   // float2 entries per image and layer
#define FULL_MASK 0xffffffffu
#define BLOCKS_PER_CUDA_BLOCK (WARPS_PER_BLOCK * BLOCKS_PER_WARP)
// CUDA blocks per pair of the GAP kernel; when they do not divide PIXELS, the warps past the last block idle
#define GAP_CHUNKS ((PIXELS + BLOCKS_PER_CUDA_BLOCK - 1) / BLOCKS_PER_CUDA_BLOCK)
#if LAP_COUNT < 0 || LAP_COUNT > 8
#error "LAP_COUNT must be 0..8 (the shared accumulators grow with it)"
#endif
// float64 sums per pair and layer of the GAP kernel: ntk, nngp, then ntk, nngp of each LAP(c)
#define GAP_SLOTS (2 * (1 + LAP_COUNT))
#define LAP_TABLE (2 * MAX_SIDE)          // lap_table row: t_c(d) at index d + MAX_SIDE, d = -32..31 for any shape
#define QUAD 8                            // LAP scratch per layer: total, top, left, top_left for ntk, then nngp

// c_sigma = 2, q^2 = 9:  Kdot = (2/9)(pi - theta)/(2 pi) = 1/9 - theta/(9 pi);
// K = Kdot * Sigma + sqrt(s s') sin(theta) / (9 pi), and the maps carry g = sqrt(s) / (3 sqrt(pi)).
#define KDOT_MAX 0.1111111111111111f
#define KDOT_SLOPE 0.0353677651315323f
#define G_SCALE 0.18806319451591877        // 1 / (3 sqrt(pi))

// Kdot and sin(theta) for theta = arccos(rho), rho in [-1, 1], branch free. arccos|rho| = sqrt(1 - |rho|) P(|rho|)
// with the degree-7 minimax polynomial of Abramowitz & Stegun 4.4.46 (|error| <= 2e-8); the factor sqrt(1 - |rho|)
// keeps theta relatively accurate as rho -> 1 (1 - |rho| is exact there) and is reused for
// sin(theta) = sqrt(1 - |rho|) sqrt(1 + |rho|). Two MUFU.RSQ, no slow-path branches (unlike acosf / sqrtf).
__device__ __forceinline__ void arccos_terms(float rho, float& kdot, float& sin_theta)
{
    const float a = fabsf(rho);
    const float u = 1.f - a;
    const float root_u = u * rsqrtf(fmaxf(u, 1e-30f));   // sqrt(1 - |rho|), exactly 0 at |rho| = 1
    float p = -0.0012624911f;
    p = fmaf(p, a, 0.0066700901f);
    p = fmaf(p, a, -0.0170881256f);
    p = fmaf(p, a, 0.0308918810f);
    p = fmaf(p, a, -0.0501743046f);
    p = fmaf(p, a, 0.0889789874f);
    p = fmaf(p, a, -0.2145988016f);
    p = fmaf(p, a, 1.5707963050f);
    const float theta_abs = root_u * p;                  // arccos|rho|; arccos(rho) = pi - theta_abs for rho < 0
    kdot = rho < 0.f ? theta_abs * KDOT_SLOPE : fmaf(theta_abs, -KDOT_SLOPE, KDOT_MAX);
    const float v = 1.f + a;
    sin_theta = root_u * (v * rsqrtf(v));
}

// Per-image diagonal maps. One CUDA block of PIXELS = P * Q threads per image, one thread per pixel.
// images: (n, P, Q, C) float32. maps: (n, layers, 2P, Q) float2 {r, g} of d_h, h = 0..layers-1, where
// d_0 = box(sum_c x_c^2), d_h = box(d_{h-1} / 9), r = 1/sqrt(d) (0 where d == 0), g = sqrt(d) / (3 sqrt(pi));
// rows P..2P-1 repeat rows 0..P-1. Computed in float64, rounded once.
extern "C" __global__ void __launch_bounds__(PIXELS)
diag_maps(const float* __restrict__ images, int n_images, int layers, float2* __restrict__ maps)
{
    __shared__ double src[PIXELS];
    const int img = blockIdx.x;
    const int t = threadIdx.x, i = t / IMAGE_COLS, j = t % IMAGE_COLS;
    if (img >= n_images) return;
    const float* px = images + (long long)img * IMAGE_FLOATS + t * CHANNELS;
    double v = 0.0;
    for (int c = 0; c < CHANNELS; ++c) v += (double)px[c] * (double)px[c];
    src[t] = v;
    __syncthreads();
    for (int h = 0; h < layers; ++h) {
        double d = 0.0;
        for (int a = -1; a <= 1; ++a)
            for (int b = -1; b <= 1; ++b)
                if (i + a >= 0 && i + a < IMAGE_ROWS && j + b >= 0 && j + b < IMAGE_COLS)
                    d += src[(i + a) * IMAGE_COLS + j + b];
        const float2 entry = make_float2(d > 0.0 ? (float)(1.0 / sqrt(d)) : 0.f, (float)(sqrt(d) * G_SCALE));
        float2* out = maps + ((long long)img * layers + h) * MAP_ENTRIES;
        out[t] = entry;
        out[t + PIXELS] = entry;
        __syncthreads();
        src[t] = d / 9.0;
        __syncthreads();
    }
}

// tr_D along rows (registers): rows cut-1 and cut lie in different displacement slices (cut == P: none).
__device__ __forceinline__ void box_rows(float (&t)[IMAGE_ROWS], int cut)
{
    float above = 0.f;
#pragma unroll
    for (int i = 0; i < IMAGE_ROWS; ++i) {
        const float here = t[i];
        float s = here;
        if (i > 0 && i != cut) s += above;
        if (i + 1 < IMAGE_ROWS && i + 1 != cut) s += t[i + 1];
        t[i] = s;
        above = here;
    }
}

// tr_D along columns (lanes): left_on / right_on are 1 where the neighbouring lane is in the same slice, else 0.
__device__ __forceinline__ float box_cols(float v, float left_on, float right_on)
{
    const float left = __shfl_up_sync(FULL_MASK, v, 1);
    const float right = __shfl_down_sync(FULL_MASK, v, 1);
    return fmaf(left_on, left, fmaf(right_on, right, v));
}

__device__ __forceinline__ float warp_sum(float v)
{
#pragma unroll
    for (int offset = 16; offset > 0; offset >>= 1) v += __shfl_xor_sync(FULL_MASK, v, offset);
    return v;
}

// LAP(c) of one displacement block (ci, cj), after its layer loop. The block holds up to four true displacement
// slices split by the cut lines: rows i < P - ci have delta_row = ci, the others ci - P; lanes j < Q - cj have
// delta_col = cj, the others cj - Q. quad (MAX_LAYERS, QUAD) float32 holds per layer and kind the warp sums total,
// top (rows above the row cut), left (lanes left of the column cut) and top_left; the quadrant sums follow by
// differences (all terms >= 0, and the largest quadrant always has the largest weight, so the cancellation stays
// ~1e-7 of the weighted sum). Lane l takes layers l, l + 32, ... and adds, for the r-th c and each kind,
// sum_q t_c(delta_row_q) t_c(delta_col_q) S_q to acc[GAP_SLOTS h + 2 + 2r + kind]. table: (LAP_COUNT, LAP_TABLE).
__device__ __forceinline__ void lap_weigh(const float* quad, const double* __restrict__ table, int ci, int cj,
                                          int layers, double* acc)
{
    for (int h = threadIdx.x % 32; h < layers; h += 32) {
#pragma unroll
        for (int kind = 0; kind < 2; ++kind) {
            const float* q = quad + h * QUAD + 4 * kind;
            const double total = q[0], top = q[1], left = q[2], tl = q[3];
            const double tr = top - tl, bl = left - tl, br = total - top - left + tl;
#pragma unroll
            for (int r = 0; r < LAP_COUNT; ++r) {
                const double* t = table + r * LAP_TABLE;
                const double left_w = __ldg(t + MAX_SIDE + cj);                       // delta_col cj
                const double right_w = __ldg(t + MAX_SIDE + cj - IMAGE_COLS);           // delta_col cj - Q
                acc[GAP_SLOTS * h + 2 + 2 * r + kind] += __ldg(t + MAX_SIDE + ci) * fma(left_w, tl, right_w * tr)
                    + __ldg(t + MAX_SIDE + ci - IMAGE_ROWS) * fma(left_w, bl, right_w * br);
            }
        }
    }
}

// All L layers of one displacement block (ci, cj) of the pair (x, y). Lane 0 adds the block's sums of layer h
// (h = 1..layers) to acc[S(h-1)] (ntk) and acc[S(h-1)+1] (nngp), S = GAP_SLOTS for GAP and 2 for vanilla: GAP
// sums Kdot*Theta and K over the block, vanilla (ci = cj = 0) sums Kdot*Theta + K and K; with LAP_COUNT > 0 the
// GAP kernel also writes the warp sums lap_weigh needs to quad[QUAD (h-1) ..] (a per-warp scratch). rho_low = 1
// forces rho = 1 (an image with itself at zero displacement, where Cauchy-Schwarz holds with equality), else -1.
template <bool GAP>
__device__ __forceinline__ void cntk_block(const float* __restrict__ x, const float* __restrict__ y,
                                           const float2* __restrict__ x_maps, const float2* __restrict__ y_maps,
                                           int ci, int cj, float rho_low, int layers, double* acc, float* quad)
{
    constexpr bool lap = GAP && LAP_COUNT > 0;
    constexpr int slots = GAP ? GAP_SLOTS : 2;
    constexpr bool narrow = IMAGE_COLS < 32;   // lanes IMAGE_COLS..31 hold no column
    const int lane = threadIdx.x % 32;
    const bool active = !narrow || lane < IMAGE_COLS;
    const int j = active ? lane : IMAGE_COLS - 1;   // an idle lane shadows the last column: finite values, no sums
    const int jy = (j + cj) % IMAGE_COLS;
    const int row_cut = IMAGE_ROWS - ci, col_cut = IMAGE_COLS - cj;
    const float left_on = (active && j > 0 && j != col_cut) ? 1.f : 0.f;
    const float right_on = (active && j + 1 < IMAGE_COLS && j + 1 != col_cut) ? 1.f : 0.f;

    float sigma[IMAGE_ROWS], theta[IMAGE_ROWS];
#pragma unroll
    for (int i = 0; i < IMAGE_ROWS; ++i) {   // Sigma_0 = tr_D(sum_c x_c y_c)
        const float* px = x + (i * IMAGE_COLS + j) * CHANNELS;
        const float* py = y + (((i + ci) % IMAGE_ROWS) * IMAGE_COLS + jy) * CHANNELS;
        float s = px[0] * py[0];
#pragma unroll
        for (int c = 1; c < CHANNELS; ++c) s = fmaf(px[c], py[c], s);
        sigma[i] = s;
    }
    box_rows(sigma, row_cut);
#pragma unroll
    for (int i = 0; i < IMAGE_ROWS; ++i) {
        sigma[i] = box_cols(sigma[i], left_on, right_on);
        theta[i] = GAP ? 0.f : sigma[i];
    }

    for (int h = 0; h < layers; ++h) {   // layer h + 1 normalises by the maps of d_h
        const float2* mx = x_maps + h * MAP_ENTRIES + j;
        const float2* my = y_maps + h * MAP_ENTRIES + ci * IMAGE_COLS + jy;
        float sum_ntk = 0.f, sum_nngp = 0.f;
        float top_ntk = 0.f, top_nngp = 0.f;   // LAP: the running sums at the row cut (rows i < row_cut)
#pragma unroll
        for (int i = 0; i < IMAGE_ROWS; ++i) {
            const float2 nx = __ldg(mx + i * IMAGE_COLS), ny = __ldg(my + i * IMAGE_COLS);
            const float rho = fminf(fmaxf(sigma[i] * (nx.x * ny.x), rho_low), 1.f);
            float kdot, sin_theta;
            arccos_terms(rho, kdot, sin_theta);
            const float k = fmaf(kdot, sigma[i], (nx.y * ny.y) * sin_theta);
            const float carried = kdot * theta[i];
            sigma[i] = k;
            theta[i] = carried + k;
            sum_ntk += GAP ? carried : theta[i];
            sum_nngp += k;
            if (lap && i + 1 == row_cut) {
                top_ntk = sum_ntk;
                top_nngp = sum_nngp;
            }
        }
        if (!active) {   // only where IMAGE_COLS < 32
            sum_ntk = sum_nngp = top_ntk = top_nngp = 0.f;
        }
        if (lap) {   // one value at a time to shared memory: nothing more stays live beside Sigma and Theta
            const bool left = j < col_cut;
            const float parts[6] = {top_ntk, left ? sum_ntk : 0.f, left ? top_ntk : 0.f,
                                    top_nngp, left ? sum_nngp : 0.f, left ? top_nngp : 0.f};
#pragma unroll
            for (int v = 0; v < 6; ++v) {
                const float total = warp_sum(parts[v]);
                if (lane == 0) quad[h * QUAD + (v < 3 ? 1 + v : 2 + v)] = total;
            }
        }
        sum_ntk = warp_sum(sum_ntk);
        sum_nngp = warp_sum(sum_nngp);
        if (lane == 0) {
            acc[slots * h] += (double)sum_ntk;
            acc[slots * h + 1] += (double)sum_nngp;
            if (lap) {
                quad[h * QUAD] = sum_ntk;
                quad[h * QUAD + 4] = sum_nngp;
            }
        }
        if (h + 1 < layers) {   // Sigma_h = tr_D(K), Theta_h = tr_D(Kdot Theta + K)
            box_rows(sigma, row_cut);
            box_rows(theta, row_cut);
#pragma unroll
            for (int i = 0; i < IMAGE_ROWS; ++i) {
                sigma[i] = box_cols(sigma[i], left_on, right_on);
                theta[i] = box_cols(theta[i], left_on, right_on);
            }
        }
    }
}

// Kernel arguments shared by both tile kernels:
//   x_images (nx, P, Q, C), y_images (ny, P, Q, C) float32; x_maps, y_maps from diag_maps with the same layers;
//   pair_x, pair_y (n_pairs,) int32 image indices; pair_self (n_pairs,) uint8, 1 where the two images are identical;
//   out (n_pairs, layers, 2) float64, zeroed by the caller: [p, h-1, 0] ntk, [p, h-1, 1] nngp for depth h + 1.
// The GAP kernel of a LAP_COUNT = k > 0 build also takes lap_table (k, LAP_TABLE) float64, row r the triangle
// weights t_c(d) = (1 - |d| / (2c + 1))_+ of the r-th c at index d + 32 (d = -32..31 whatever the image size), and
// its out is (n_pairs, layers, GAP_SLOTS): [p, h-1, 2 + 2r] ntk-lap, [p, h-1, 3 + 2r] nngp-lap of the r-th c (sums
// weighted by w_c = t_c(d_row) t_c(d_col)).
#if LAP_COUNT > 0
#define LAP_TABLE_PARAM const double* __restrict__ lap_table,
#else
#define LAP_TABLE_PARAM
#endif

// CNTK-GAP: grid n_pairs * GAP_CHUNKS blocks of WARPS_PER_BLOCK * 32 threads, CUDA block `chunk` of a pair running
// displacement blocks chunk * BLOCKS_PER_CUDA_BLOCK ... (block b is (ci, cj) = (b / Q, b % Q)). out holds sums over
// all (PQ)^2 entries (the caller divides by (PQ)^2 for the mean: 2^20 at 32x32).
extern "C" __global__ void __launch_bounds__(WARPS_PER_BLOCK * 32, MIN_BLOCKS_PER_SM)
cntk_gap_tile(const float* __restrict__ x_images, const float* __restrict__ y_images,
              const float2* __restrict__ x_maps, const float2* __restrict__ y_maps,
              const int* __restrict__ pair_x, const int* __restrict__ pair_y,
              const unsigned char* __restrict__ pair_self, int n_pairs, int layers, LAP_TABLE_PARAM
              double* __restrict__ out)
{
    __shared__ double acc[WARPS_PER_BLOCK][GAP_SLOTS * MAX_LAYERS];
#if LAP_COUNT > 0
    __shared__ float quad[WARPS_PER_BLOCK][QUAD * MAX_LAYERS];
#define QUAD_ARG quad[warp]
#else
#define QUAD_ARG nullptr
#endif
    const int warp = threadIdx.x / 32;
    const int p = blockIdx.x / GAP_CHUNKS, chunk = blockIdx.x % GAP_CHUNKS;
    if (p >= n_pairs || layers > MAX_LAYERS) return;   // uniform over the block
    for (int k = threadIdx.x; k < WARPS_PER_BLOCK * GAP_SLOTS * MAX_LAYERS; k += blockDim.x) (&acc[0][0])[k] = 0.0;
    __syncthreads();
    const int a = pair_x[p], b = pair_y[p];
#pragma unroll 1
    for (int s = 0; s < BLOCKS_PER_WARP; ++s) {
        const int block = (chunk * WARPS_PER_BLOCK + warp) * BLOCKS_PER_WARP + s;
#if PIXELS % BLOCKS_PER_CUDA_BLOCK != 0
        if (block >= PIXELS) break;   // uniform over the warp; the last CUDA block of a pair is not full
#endif
        const float rho_low = (pair_self[p] && block == 0) ? 1.f : -1.f;
        cntk_block<true>(x_images + (long long)a * IMAGE_FLOATS, y_images + (long long)b * IMAGE_FLOATS,
                         x_maps + (long long)a * layers * MAP_ENTRIES, y_maps + (long long)b * layers * MAP_ENTRIES,
                         block / IMAGE_COLS, block % IMAGE_COLS, rho_low, layers, acc[warp], QUAD_ARG);
#if LAP_COUNT > 0
        __syncwarp();
        lap_weigh(quad[warp], lap_table, block / IMAGE_COLS, block % IMAGE_COLS, layers, acc[warp]);
        __syncwarp();   // quad is reused by the next block of this warp
#endif
    }
    __syncthreads();
    for (int k = threadIdx.x; k < GAP_SLOTS * layers; k += blockDim.x) {
        double total = 0.0;
        for (int w = 0; w < WARPS_PER_BLOCK; ++w) total += acc[w][k];
        atomicAdd(out + (long long)p * GAP_SLOTS * layers + k, total);
    }
}

// CNTK-V: only the zero-displacement block (0, 0); one warp per pair, grid ceil(n_pairs / WARPS_PER_BLOCK) blocks
// of WARPS_PER_BLOCK * 32 threads. out holds the traces (sums over i = i', j = j').
extern "C" __global__ void __launch_bounds__(WARPS_PER_BLOCK * 32, MIN_BLOCKS_PER_SM)
cntk_vanilla_tile(const float* __restrict__ x_images, const float* __restrict__ y_images,
                  const float2* __restrict__ x_maps, const float2* __restrict__ y_maps,
                  const int* __restrict__ pair_x, const int* __restrict__ pair_y,
                  const unsigned char* __restrict__ pair_self, int n_pairs, int layers, double* __restrict__ out)
{
    __shared__ double acc[WARPS_PER_BLOCK][2 * MAX_LAYERS];
    const int warp = threadIdx.x / 32, lane = threadIdx.x % 32;
    const int p = blockIdx.x * WARPS_PER_BLOCK + warp;
    if (p >= n_pairs || layers > MAX_LAYERS) return;   // uniform over the warp; no block-wide barrier below
    for (int k = lane; k < 2 * layers; k += 32) acc[warp][k] = 0.0;
    __syncwarp();
    const int a = pair_x[p], b = pair_y[p];
    cntk_block<false>(x_images + (long long)a * IMAGE_FLOATS, y_images + (long long)b * IMAGE_FLOATS,
                      x_maps + (long long)a * layers * MAP_ENTRIES, y_maps + (long long)b * layers * MAP_ENTRIES,
                      0, 0, pair_self[p] ? 1.f : -1.f, layers, acc[warp], nullptr);
    __syncwarp();
    for (int k = lane; k < 2 * layers; k += 32) out[(long long)p * 2 * layers + k] = acc[warp][k];
}

// Places one launch's per-pair sums into the tile's result on the device, so the host copies each tile once.
//   sums (count, layers, S) float64 from a tile kernel (the `out` above), S = GAP_SLOTS (2 in the plain build; a
//   LAP build's scatter serves its GAP kernel only); pair_x, pair_y (count,) int32 sub-tile image indices; result
//   (S, layers, rows, cols) float32, [kind, h-1, r, c] for depth h + 1 (kind 0 ntk, 1 nngp, 2 + 2r + kind LAP).
// Pair p goes to row row0 + pair_x[p], column col0 + pair_y[p], scaled by `scale` (GAP: (PQ)^-2 for the mean) and
// rounded once to float32; mirror != 0 (diagonal tiles, rows == cols) also writes the transposed entry.
// Grid: ceil(count * S * layers / blockDim.x) blocks; thread t takes value k = t / count of pair p = t % count, so
// consecutive threads write neighbouring pairs of one (kind, layer) plane.
extern "C" __global__ void __launch_bounds__(256)
scatter_pairs(const double* __restrict__ sums, const int* __restrict__ pair_x, const int* __restrict__ pair_y,
              int count, int layers, double scale, int row0, int col0, int rows, int cols, int mirror,
              float* __restrict__ result)
{
    const long long t = (long long)blockIdx.x * blockDim.x + threadIdx.x;
    if (t >= (long long)count * GAP_SLOTS * layers) return;
    const int k = (int)(t / count), p = (int)(t % count);      // k = S (h - 1) + kind, the index into sums[p]
    const float value = (float)(sums[(long long)p * GAP_SLOTS * layers + k] * scale);
    float* plane = result + ((long long)(k % GAP_SLOTS) * layers + k / GAP_SLOTS) * rows * cols;
    const long long r = row0 + pair_x[p], c = col0 + pair_y[p];
    plane[r * cols + c] = value;
    if (mirror) plane[c * cols + r] = value;
}
