// The CPU kernels of moe-serve's serving ops, registered in C++ on torch's dispatcher (engine/native_ops.py).
//
// A compiled decode step calls `moe_serve::cpu_paged_attention` and `moe_serve::cpu_layer_experts` once per layer,
// and a bf16 step of more than one row `moe_serve::cpu_dense_linears` for its projections. Served by Python, each
// call crossed from the graph's C++ into the interpreter (about 10 us, with a batch-1 kernel of 5-20 us); served
// here, the dispatcher calls these boxed functions directly. The first two read what the Python ops read from
// the forward context (the step's paged metadata, each layer's caches and experts) from two plain structs that
// engine/native_ops.py fills and points at (set_step_context, set_expert_context); all three run the kernels of
// cpu_kernels.c through the table given to moe_serve_native_init. What they do not serve (steps with prefill
// chunks, other dtypes or layouts, another MoE backend, more rows than the linears kernel takes) goes to the
// Python ops, the reference, through the dispatcher: the same answer, the old cost. A many-token step also counts
// each layer's routed slots here (`moe_serve::cpu_count_routes`), one call where inductor generated a dozen
// scatter kernels. Only torch's stable C ABI is used (shim.h), so this builds in about two seconds.
#include <torch/csrc/stable/c/shim.h>
#include <torch/csrc/stable/stableivalue_conversions.h>

#include <atomic>
#include <chrono>
#include <cstdint>
#include <cstdlib>
#include <cstring>
#include <stdexcept>
#include <string>
#include <vector>

namespace {

// A stack slot as a value (tensors as handles, float arguments as doubles) and back.
template <typename T>
T to(StableIValue value) {
    return torch::stable::detail::to<T>(value);
}
StableIValue from(AtenTensorHandle tensor) { return torch::stable::detail::from<AtenTensorHandle>(tensor); }

// Filled by engine/native_ops.py (ctypes structures of the same layout).
struct StepContext {
    int64_t num_decodes;  // the step's decode rows; -1 when it has prefill chunks
    int64_t table_width;  // columns of block_tables
    int64_t block_size, kv_heads, head_dim, num_layers;
    int32_t dtype;  // the caches': 0 float32, 1 bfloat16
    int32_t threads;
    const int64_t *slots, *block_tables, *seq_lens;
    void *const *k_caches;
    void *const *v_caches;
};

struct LayerExperts {
    const void *w13, *w2;  // [E, 2I, H] and [E, H, I], contiguous; null: the layer is not served here
    const int64_t *rows;   // router id -> row of w13/w2 (num_ids entries), or null where ids are rows
    int64_t num_ids, num_rows, hidden, intermediate;
    int32_t dtype;  // 0 float32, 1 bfloat16
};

struct ExpertContext {
    int64_t num_layers;
    const LayerExperts *layers;
};

using ExpertFn = void (*)(const void *, const int64_t *, const float *, int64_t, int64_t, int64_t, int64_t, int64_t,
                          const void *, const void *, float *, int);
using AttentionFn = void (*)(const void *, const void *, const void *, void *, void *, const int64_t *,
                             const int64_t *, const int64_t *, int64_t, int64_t, int64_t, int64_t, int64_t, int64_t,
                             float, void *, int);

using LinearsFn = int (*)(const void *, int64_t, int64_t, int64_t, const void *const *, const int64_t *, void *, int,
                          int);
using AmxFn = int (*)(int);

ExpertFn expert_fns[2];
AttentionFn attention_fns[2];
LinearsFn linears_fn = nullptr;
AmxFn amx_enabled = nullptr;
int64_t linear_rows[2];  // up to how many rows the dense linears take the kernel: without AMX, with it
const StepContext *step_context = nullptr;
const ExpertContext *expert_context = nullptr;
// attention here, by the reference; experts here, by the reference; dense linears here, by the reference; route
// counts here, by the reference
std::atomic<int64_t> served[8];
// With clocking on (engine/breakdown.py), the seconds the two kernels took, in the engine's thread.
std::atomic<bool> clocking{false};
double kernel_seconds[2];

// Times a kernel call into kernel_seconds[part] while clocking is on.
template <typename Call>
void clocked(int part, Call call) {
    if (!clocking.load(std::memory_order_relaxed)) {
        call();
        return;
    }
    const auto start = std::chrono::steady_clock::now();
    call();
    kernel_seconds[part] += std::chrono::duration<double>(std::chrono::steady_clock::now() - start).count();
}

int32_t torch_dtype(int32_t code) { return code == 0 ? aoti_torch_dtype_float32() : aoti_torch_dtype_bfloat16(); }

// Whether t is a CPU tensor of `dim` dimensions (sizes into `sizes`) in torch's dtype `dtype`.
bool plain(AtenTensorHandle t, int64_t dim, int32_t dtype, const int64_t **sizes) {
    int64_t ndim;
    int32_t device, actual;
    aoti_torch_get_dim(t, &ndim);
    aoti_torch_get_device_type(t, &device);
    aoti_torch_get_dtype(t, &actual);
    if (ndim != dim || device != aoti_torch_device_type_cpu() || actual != dtype) return false;
    aoti_torch_get_sizes(t, const_cast<int64_t **>(sizes));
    return true;
}

void *data(AtenTensorHandle t) {
    void *p;
    aoti_torch_get_data_ptr(t, &p);
    return p;
}

// A new contiguous CPU tensor of the given sizes (two or three of them) in dtype `code`.
AtenTensorHandle empty(int64_t ndim, const int64_t *sizes, int32_t code) {
    int64_t strides[3];
    strides[ndim - 1] = 1;
    for (int64_t d = ndim - 1; d > 0; d--) strides[d - 1] = strides[d] * sizes[d];
    AtenTensorHandle out;
    aoti_torch_empty_strided(ndim, sizes, strides, torch_dtype(code), aoti_torch_device_type_cpu(), 0, &out);
    return out;
}

// The reference op on the same stack (it takes the inputs' handles and leaves its output in stack[0]).
// A failure there (its message logged by torch) is raised to the caller as a RuntimeError naming the op.
void by_reference(const char *op, StableIValue *stack, std::atomic<int64_t> *count) {
    count->fetch_add(1, std::memory_order_relaxed);
    if (torch_call_dispatcher(op, "", stack, TORCH_ABI_VERSION) != AOTI_TORCH_SUCCESS)
        throw std::runtime_error(std::string(op) + " failed (its error is logged above)");
}

// t where it is contiguous, else a contiguous copy (also left in *copy, for the caller to delete): a view of
// a wider projection output, as the many-token graph passes q, k and v.
AtenTensorHandle dense(AtenTensorHandle t, int64_t ndim, const int64_t *sizes, int32_t code, AtenTensorHandle *copy) {
    bool contiguous;
    aoti_torch_is_contiguous(t, &contiguous);
    *copy = nullptr;
    if (contiguous) return t;
    *copy = empty(ndim, sizes, code);
    aoti_torch_copy_(*copy, t, false);
    return *copy;
}

void release_copies(AtenTensorHandle *copies, int count) {
    for (int i = 0; i < count; i++)
        if (copies[i] != nullptr) aoti_torch_delete_tensor_object(copies[i]);
}

void release(StableIValue *stack, int tensors) {
    for (int i = 0; i < tensors; i++) aoti_torch_delete_tensor_object(to<AtenTensorHandle>(stack[i]));
}

// cpu_paged_attention(Tensor q, Tensor k, Tensor v, int layer, float scale) -> Tensor
void paged_attention(StableIValue *stack, uint64_t, uint64_t) {
    auto q = to<AtenTensorHandle>(stack[0]), k = to<AtenTensorHandle>(stack[1]), v = to<AtenTensorHandle>(stack[2]);
    const int64_t layer = to<int64_t>(stack[3]);
    const StepContext *c = step_context;
    const int64_t *qs, *ks, *vs;
    const int32_t dtype = c != nullptr ? torch_dtype(c->dtype) : 0;
    if (c == nullptr || c->num_decodes < 0 || layer < 0 || layer >= c->num_layers || !plain(q, 3, dtype, &qs) ||
        !plain(k, 3, dtype, &ks) || !plain(v, 3, dtype, &vs) || qs[0] != c->num_decodes || ks[0] != qs[0] ||
        vs[0] != qs[0] || ks[1] != c->kv_heads || vs[1] != c->kv_heads || qs[2] != c->head_dim ||
        ks[2] != c->head_dim || vs[2] != c->head_dim || qs[1] % c->kv_heads != 0) {
        by_reference("moe_serve::paged_attention", stack, &served[1]);
        return;
    }
    AtenTensorHandle out = empty(3, qs, c->dtype), copies[3];
    q = dense(q, 3, qs, c->dtype, &copies[0]);
    k = dense(k, 3, ks, c->dtype, &copies[1]);
    v = dense(v, 3, vs, c->dtype, &copies[2]);
    clocked(0, [&] {
        attention_fns[c->dtype](data(q), data(k), data(v), c->k_caches[layer], c->v_caches[layer], c->slots,
                                c->block_tables, c->seq_lens, qs[0], c->table_width, c->block_size, qs[1],
                                c->kv_heads, c->head_dim, static_cast<float>(to<double>(stack[4])), data(out),
                                c->threads);
    });
    release_copies(copies, 3);
    release(stack, 3);
    stack[0] = from(out);
    served[0].fetch_add(1, std::memory_order_relaxed);
}

// cpu_layer_experts(Tensor x, Tensor expert_ids, Tensor weights, int layer) -> Tensor
void layer_experts(StableIValue *stack, uint64_t, uint64_t) {
    auto x = to<AtenTensorHandle>(stack[0]), ids = to<AtenTensorHandle>(stack[1]);
    auto weights = to<AtenTensorHandle>(stack[2]);
    const int64_t layer = to<int64_t>(stack[3]);
    const ExpertContext *c = expert_context;
    const LayerExperts *e = c != nullptr && layer >= 0 && layer < c->num_layers ? &c->layers[layer] : nullptr;
    const int64_t *xs, *is, *ws;
    bool ids_contiguous;
    aoti_torch_is_contiguous(ids, &ids_contiguous);
    if (e == nullptr || e->w13 == nullptr || !plain(x, 2, torch_dtype(e->dtype), &xs) || xs[1] != e->hidden ||
        !plain(weights, 2, aoti_torch_dtype_float32(), &ws) || ws[0] != xs[0] || !ids_contiguous ||
        !plain(ids, 2, aoti_torch_dtype_int64(), &is) || is[0] != xs[0] || is[1] != ws[1]) {
        by_reference("moe_serve::layer_experts", stack, &served[3]);
        return;
    }
    int64_t numel;
    aoti_torch_get_numel(ids, &numel);
    const int64_t tokens = xs[0], top_k = is[1];
    const int64_t *expert_ids = static_cast<const int64_t *>(data(ids));
    int64_t *mapped = nullptr;
    if (e->rows != nullptr) {  // released experts: router ids -> held rows, anything else a dropped slot
        mapped = static_cast<int64_t *>(std::malloc(sizeof(int64_t) * (numel ? numel : 1)));
        for (int64_t i = 0; i < numel; i++) {
            const int64_t id = expert_ids[i];
            mapped[i] = id >= 0 && id < e->num_ids ? e->rows[id] : e->num_rows;
        }
        expert_ids = mapped;
    }
    const int64_t sizes[2] = {tokens, e->hidden};
    AtenTensorHandle out = empty(2, sizes, 0);
    std::memset(data(out), 0, sizeof(float) * tokens * e->hidden);
    AtenTensorHandle copies[2];
    x = dense(x, 2, xs, e->dtype, &copies[0]);
    weights = dense(weights, 2, ws, 0, &copies[1]);
    clocked(1, [&] {
        expert_fns[e->dtype](data(x), expert_ids, static_cast<const float *>(data(weights)), tokens, top_k,
                             e->num_rows, e->hidden, e->intermediate, e->w13, e->w2, static_cast<float *>(data(out)),
                             step_context != nullptr && step_context->threads > 0 ? step_context->threads : 1);
    });
    std::free(mapped);
    release_copies(copies, 2);
    release(stack, 3);
    stack[0] = from(out);
    served[2].fetch_add(1, std::memory_order_relaxed);
}

// cpu_dense_linears(Tensor x, Tensor[] weights) -> Tensor: x [T, K] times each weight [N_i, K] (transposed), side by
// side, by linears_bf16 for bf16 rows up to the kernel's row limit; anything else by the reference. The list's
// items are read in place, so a call handed to the reference finds its stack whole.
void dense_linears(StableIValue *stack, uint64_t, uint64_t) {
    auto x = to<AtenTensorHandle>(stack[0]);
    auto list = to<StableListHandle>(stack[1]);
    const int32_t bf16 = aoti_torch_dtype_bfloat16();
    size_t count = 0;
    torch_list_size(list, &count);
    const int64_t *xs;
    bool fits = count >= 1 && count <= 8 && plain(x, 2, bf16, &xs) &&
                xs[0] <= linear_rows[amx_enabled != nullptr && amx_enabled(-1) ? 1 : 0];
    AtenTensorHandle weights[8];
    const void *pointers[8];
    int64_t widths[8], width = 0;
    for (size_t i = 0; fits && i < count; i++) {
        StableIValue item;
        torch_list_get_item(list, i, &item);
        weights[i] = to<AtenTensorHandle>(item);
        const int64_t *ws;
        bool contiguous;
        aoti_torch_is_contiguous(weights[i], &contiguous);
        fits = plain(weights[i], 2, bf16, &ws) && contiguous && ws[1] == xs[1];
        pointers[i] = fits ? data(weights[i]) : nullptr;
        widths[i] = fits ? ws[0] : 0;
        width += widths[i];
    }
    AtenTensorHandle out = nullptr, copy = nullptr;
    if (fits) {
        const int64_t sizes[2] = {xs[0], width};
        out = empty(2, sizes, 1);
        x = dense(x, 2, xs, 1, &copy);
        const int threads = step_context != nullptr && step_context->threads > 0 ? step_context->threads : 1;
        fits = linears_fn(data(x), xs[0], xs[1], static_cast<int64_t>(count), pointers, widths, data(out), 1,
                          threads) != 0;
        release_copies(&copy, 1);
        if (!fits) aoti_torch_delete_tensor_object(out);
    }
    if (!fits) {
        by_reference("moe_serve::dense_linears", stack, &served[5]);
        return;
    }
    for (size_t i = 0; i < count; i++) aoti_torch_delete_tensor_object(weights[i]);
    torch_delete_list(list);
    release(stack, 1);
    stack[0] = from(out);
    served[4].fetch_add(1, std::memory_order_relaxed);
}

// cpu_count_routes(Tensor(a!) counts, Tensor expert_ids, Tensor token_mask, int layer) -> (): ExpertLoad.record
// (engine/moe.py) for one layer's slots [T, k]: per expert id (the sentinel E included) the slots of counted tokens
// (token_mask 1), one more forward in the column of how many distinct experts the slots read (padding rows
// included: they are read), and the tokens counted. Ids out of [0, E] go to the reference, which raises.
void count_routes(StableIValue *stack, uint64_t, uint64_t) {
    auto counts = to<AtenTensorHandle>(stack[0]), ids = to<AtenTensorHandle>(stack[1]);
    auto mask = to<AtenTensorHandle>(stack[2]);
    const int64_t layer = to<int64_t>(stack[3]);
    const int32_t i64 = aoti_torch_dtype_int64();
    const int64_t *cs, *is, *ms;
    bool fits = plain(counts, 2, i64, &cs) && plain(ids, 2, i64, &is) && plain(mask, 1, i64, &ms) &&
                ms[0] == is[0] && layer >= 0 && layer < cs[0] && cs[1] >= 5 && (cs[1] - 3) % 2 == 0;
    for (AtenTensorHandle t : {counts, ids, mask}) {
        bool contiguous = false;
        if (fits) aoti_torch_is_contiguous(t, &contiguous);
        fits = fits && contiguous;
    }
    const int64_t experts = fits ? (cs[1] - 3) / 2 : 0, slots = fits ? is[0] * is[1] : 0;
    const int64_t *id = fits ? static_cast<const int64_t *>(data(ids)) : nullptr;
    for (int64_t i = 0; i < slots && fits; i++) fits = id[i] >= 0 && id[i] <= experts;
    if (!fits) {
        by_reference("moe_serve::count_routes", stack, &served[7]);
        return;
    }
    int64_t *row = static_cast<int64_t *>(data(counts)) + layer * cs[1];
    const int64_t *m = static_cast<const int64_t *>(data(mask));
    std::vector<char> read(experts + 1, 0);
    int64_t used = 0, tokens = 0;
    for (int64_t t = 0; t < is[0]; t++) {
        tokens += m[t];
        for (int64_t j = 0; j < is[1]; j++) {
            const int64_t e = id[t * is[1] + j];
            row[e] += m[t];
            used += read[e] == 0 && e < experts;
            read[e] = 1;
        }
    }
    row[experts + 1 + used] += 1;
    row[2 * experts + 2] += tokens;
    release(stack, 3);
    served[6].fetch_add(1, std::memory_order_relaxed);
}

}  // namespace

extern "C" {

// The kernels of cpu_kernels.c (float32 then bfloat16 of each; the bf16 linears and the AMX switch), the dense
// linears' row limits (without AMX, with it), and the ops' registration on the CPU key.
int moe_serve_native_init(void *attention_f32, void *attention_bf16, void *experts_f32, void *experts_bf16,
                          void *linears_bf16, void *amx, int64_t rows, int64_t rows_amx) {
    attention_fns[0] = reinterpret_cast<AttentionFn>(attention_f32);
    attention_fns[1] = reinterpret_cast<AttentionFn>(attention_bf16);
    expert_fns[0] = reinterpret_cast<ExpertFn>(experts_f32);
    expert_fns[1] = reinterpret_cast<ExpertFn>(experts_bf16);
    linears_fn = reinterpret_cast<LinearsFn>(linears_bf16);
    amx_enabled = reinterpret_cast<AmxFn>(amx);
    linear_rows[0] = rows;
    linear_rows[1] = rows_amx;
    static TorchLibraryHandle library = nullptr;
    if (library != nullptr) return 0;
    if (aoti_torch_library_init_impl("moe_serve", "CPU", __FILE__, __LINE__, &library) != AOTI_TORCH_SUCCESS ||
        torch_library_impl(library, "cpu_paged_attention", paged_attention, TORCH_ABI_VERSION) !=
            AOTI_TORCH_SUCCESS ||
        torch_library_impl(library, "cpu_layer_experts", layer_experts, TORCH_ABI_VERSION) != AOTI_TORCH_SUCCESS ||
        torch_library_impl(library, "cpu_dense_linears", dense_linears, TORCH_ABI_VERSION) != AOTI_TORCH_SUCCESS ||
        torch_library_impl(library, "cpu_count_routes", count_routes, TORCH_ABI_VERSION) != AOTI_TORCH_SUCCESS)
        return 1;
    return 0;
}

void moe_serve_set_step_context(const StepContext *context) { step_context = context; }
void moe_serve_set_expert_context(const ExpertContext *context) { expert_context = context; }
void moe_serve_clock_kernels(int on) { clocking.store(on != 0); }
void moe_serve_kernel_seconds(double *out) { std::memcpy(out, kernel_seconds, sizeof(kernel_seconds)); }
void moe_serve_served(int64_t *out) {
    for (int i = 0; i < 8; i++) out[i] = served[i].load(std::memory_order_relaxed);
}
}
