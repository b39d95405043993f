/*
 * embstore TensorFlow custom op: EmbstoreGather(ref, ids) -> rows, a native kernel that
 * reads rows straight from a table's mapped shards into the output tensor, with no
 * Python, no GIL and no copy on the hot path.
 *
 * Built lazily by embstore/tensorflow/_native_op.py with TensorFlow's headers
 * (tf.sysconfig) and loaded with tf.load_op_library; if it cannot be built the Python
 * PyFunc path (ops.py) serves every lookup instead.
 *
 * A kernel knows a table only by its reference string (ops.py). Python binds a
 * reference to the table's native RowSource (embstore/_native/rows.c) through
 * embstore_tf_bind(); the binding holds a strong reference to the RowSource, and the
 * RowSource holds buffer exports of the shard mappings, so the memory stays mapped for as
 * long as a kernel may read it (ShardSet.close tolerates the exports: the mappings close
 * when the last reference goes). A kernel meeting an unbound reference, or an id beyond
 * the bound row count (a reader whose writer published more rows), calls the Python
 * resolver under the GIL, which resolves the reference as the PyFunc path does, binds
 * it, or returns embstore's error message. Python unbinds everything whenever the
 * process's reference resolution changes (set_store_path, register_store...).
 *
 * A reference whose store is served by versions (embstore.tensorflow.load(follow=True))
 * is bound with a patcher: after the kernel gathers the newest rows, it calls the
 * patcher under the GIL with the ids and the output, and the patcher puts back the
 * values of the version being served (embstore.follow.Follower.patch). The gather itself
 * stays native; only the patch (a lookup in the version's undo records) is Python.
 *
 * Reads are rows.c's, from the same code: rowsource.h (addressing, decoding
 * float32/float16/bfloat16/int8-with-scale to float32, the grouped seqlock gather that
 * never returns a torn row while a writer in any process updates it), and the RowSource
 * object's layout comes from the same header. bind() refuses an object whose fields do
 * not match the geometry Python reports for the table.
 */
#define PY_SSIZE_T_CLEAN
#include <Python.h>
#include <sched.h>

#include <cstdint>
#include <cstring>
#include <memory>
#include <mutex>
#include <shared_mutex>
#include <string>
#include <unordered_map>
#include <vector>

#include "rowsource.h"
#include "tensorflow/core/framework/op.h"
#include "tensorflow/core/framework/op_kernel.h"
#include "tensorflow/core/framework/shape_inference.h"

namespace {

const float *F16Table() {
  static const std::vector<float> table = [] {
    std::vector<float> t(65536);
    es_fill_f16_table(t.data());
    return t;
  }();
  return table.data();
}

struct Binding {
  PyObject *owner;    // strong reference to the RowSource
  PyObject *patcher;  // strong reference, or nullptr: rows are served as gathered
  const RowSource *src;
  Binding(PyObject *o, PyObject *p)
      : owner(o), patcher(p), src(reinterpret_cast<const RowSource *>(o)) {}
  ~Binding() {
    // The last reference may go on a TensorFlow thread: take the GIL to drop the
    // RowSource. Never called with g_mu held (see Bind/UnbindAll), so no lock-order
    // inversion with a Python thread that holds the GIL and waits for g_mu.
    if (Py_IsInitialized()) {
      PyGILState_STATE g = PyGILState_Ensure();
      Py_DECREF(owner);
      Py_XDECREF(patcher);
      PyGILState_Release(g);
    }
  }
};

std::shared_mutex g_mu;
std::unordered_map<std::string, std::shared_ptr<Binding>> *g_bindings =
    new std::unordered_map<std::string, std::shared_ptr<Binding>>();  // never destroyed:
    // at exit Python is gone and the RowSources must not be released
PyObject *g_resolver = nullptr;  // guarded by the GIL

std::shared_ptr<Binding> Find(const std::string &ref) {
  std::shared_lock<std::shared_mutex> lock(g_mu);
  auto it = g_bindings->find(ref);
  return it == g_bindings->end() ? nullptr : it->second;
}

/* The Python error raised by a call, as a status (and cleared). */
absl::Status FetchError(const char *what) {
  PyObject *type, *value, *tb;
  PyErr_Fetch(&type, &value, &tb);
  PyObject *text = value ? PyObject_Str(value) : nullptr;
  const char *msg = text ? PyUnicode_AsUTF8(text) : nullptr;
  absl::Status st = absl::InternalError(std::string(what) + (msg ? msg : "?"));
  PyErr_Clear();
  Py_XDECREF(text);
  Py_XDECREF(type);
  Py_XDECREF(value);
  Py_XDECREF(tb);
  return st;
}

/* A call's result: None is OK, a str is embstore's error message. */
absl::Status ResultStatus(PyObject *r, const char *what) {
  if (r == nullptr) return FetchError(what);
  absl::Status st = absl::OkStatus();
  if (r != Py_None) {
    const char *msg = PyUnicode_Check(r) ? PyUnicode_AsUTF8(r) : nullptr;
    st = absl::InvalidArgumentError(msg ? msg : "embstore: lookup failed");
    PyErr_Clear();
  }
  Py_DECREF(r);
  return st;
}

/* Put the served version's values into `out` (rows of `ids`, gathered newest). */
absl::Status CallPatcher(PyObject *patcher, const void *ids, bool ids64, int64_t n, float *out) {
  if (!Py_IsInitialized()) return absl::FailedPreconditionError("embstore: Python is not running");
  PyGILState_STATE g = PyGILState_Ensure();
  PyObject *r = PyObject_CallFunction(patcher, "KiLK", (unsigned long long)(uintptr_t)ids,
                                      ids64 ? 1 : 0, (long long)n,
                                      (unsigned long long)(uintptr_t)out);
  absl::Status st = ResultStatus(r, "embstore patcher failed: ");
  PyGILState_Release(g);
  return st;
}

/* Ask Python to resolve and bind `ref` (and, with has_bad, to check id `bad` after a
 * refresh). OK when bound; InvalidArgument with embstore's message otherwise. */
absl::Status CallResolver(const std::string &ref, bool has_bad, int64_t bad) {
  if (!Py_IsInitialized()) return absl::FailedPreconditionError("embstore: Python is not running");
  PyGILState_STATE g = PyGILState_Ensure();
  absl::Status st = absl::OkStatus();
  if (g_resolver == nullptr) {
    st = absl::FailedPreconditionError(
        "embstore: no resolver registered (import embstore.tensorflow before running)");
  } else {
    PyObject *r = PyObject_CallFunction(g_resolver, "y#iL", ref.data(), (Py_ssize_t)ref.size(),
                                        has_bad ? 1 : 0, (long long)bad);
    st = ResultStatus(r, "embstore resolver failed: ");
  }
  PyGILState_Release(g);
  return st;
}

template <typename T>
class EmbstoreGatherOp : public tensorflow::OpKernel {
 public:
  explicit EmbstoreGatherOp(tensorflow::OpKernelConstruction *c) : OpKernel(c) {
    OP_REQUIRES_OK(c, c->GetAttr("dim", &dim_));
  }

  void Compute(tensorflow::OpKernelContext *ctx) override {
    const tensorflow::Tensor &ref_t = ctx->input(0);
    OP_REQUIRES(ctx, tensorflow::TensorShapeUtils::IsScalar(ref_t.shape()),
                absl::InvalidArgumentError("embstore: ref must be a string scalar"));
    const std::string ref(ref_t.scalar<tensorflow::tstring>()());
    const tensorflow::Tensor &ids_t = ctx->input(1);
    tensorflow::TensorShape out_shape = ids_t.shape();
    OP_REQUIRES_OK(ctx, out_shape.AddDimWithStatus(dim_));
    tensorflow::Tensor *out = nullptr;
    OP_REQUIRES_OK(ctx, ctx->allocate_output(0, out_shape, &out));
    const T *ids = ids_t.flat<T>().data();
    const int64_t n = ids_t.NumElements();
    float *dst = out->flat<float>().data();
    const float *f16 = F16Table();
    bool refreshed = false;
    for (int attempt = 0; attempt < 4; attempt++) {
      std::shared_ptr<Binding> b = Find(ref);
      if (!b) {
        OP_REQUIRES_OK(ctx, CallResolver(ref, false, 0));
        continue;
      }
      const RowSource *s = b->src;
      OP_REQUIRES(ctx, s->dim == dim_,
                  absl::InvalidArgumentError("embstore: the table's dim " + std::to_string(s->dim) +
                                             " differs from the graph's " + std::to_string(dim_)));
      const int64_t num_rows = __atomic_load_n(&s->num_rows, __ATOMIC_ACQUIRE);
      const int64_t bad = es_first_bad(ids, sizeof(T) == 8, n, num_rows);
      if (bad >= 0) {
        // A reader may lag its writer: refresh once through Python, which rebinds or
        // returns the IdOutOfRangeError message.
        OP_REQUIRES(ctx, !refreshed,
                    absl::InvalidArgumentError("IdOutOfRangeError: row id " +
                                               std::to_string((int64_t)ids[bad]) +
                                               " is out of range: expected 0 <= id < " +
                                               std::to_string(num_rows)));
        OP_REQUIRES_OK(ctx, CallResolver(ref, true, (int64_t)ids[bad]));
        refreshed = true;
        continue;
      }
      const es_view v = es_view_of(s, f16);
      OP_REQUIRES(ctx, es_gather(&v, ids, sizeof(T) == 8, n, dst) == 0,
                  absl::UnavailableError(
                      "TornReadError: a row stayed locked by a writer; the writer probably "
                      "died mid-update: reopen the store for writing to recover it"));
      if (b->patcher != nullptr && n > 0)
        OP_REQUIRES_OK(ctx, CallPatcher(b->patcher, ids, sizeof(T) == 8, n, dst));
      return;
    }
    ctx->SetStatus(absl::InternalError("embstore: could not bind " + ref));
  }

 private:
  int64_t dim_;
};

}  // namespace

REGISTER_OP("EmbstoreGather")
    .Input("ref: string")
    .Input("ids: Tids")
    .Output("rows: float")
    .Attr("Tids: {int32, int64}")
    .Attr("dim: int >= 1")
    .SetIsStateful()  // reads a store that changes: never constant-folded or CSE'd
    .SetShapeFn([](tensorflow::shape_inference::InferenceContext *c) {
      int64_t dim;
      TF_RETURN_IF_ERROR(c->GetAttr("dim", &dim));
      tensorflow::shape_inference::ShapeHandle out;
      TF_RETURN_IF_ERROR(c->Concatenate(c->input(1), c->Vector(dim), &out));
      c->set_output(0, out);
      return absl::OkStatus();
    })
    .Doc("Rows of `ids` from the embstore table named by `ref`, decoded to float32.");

REGISTER_KERNEL_BUILDER(
    Name("EmbstoreGather").Device(tensorflow::DEVICE_CPU).TypeConstraint<int32_t>("Tids"),
    EmbstoreGatherOp<int32_t>);
REGISTER_KERNEL_BUILDER(
    Name("EmbstoreGather").Device(tensorflow::DEVICE_CPU).TypeConstraint<int64_t>("Tids"),
    EmbstoreGatherOp<int64_t>);

/* --- called from Python through ctypes.PyDLL (GIL held) -------------------------------- */

extern "C" {

int embstore_tf_abi_version(void) { return 2; }

/* Bind `ref` to a RowSource after checking that the layout this op was compiled with
 * (rowsource.h) reads the geometry Python knows; `patcher`: None, or the callable that
 * puts a served version's values into every gather. Returns 0, or -1 on a mismatch
 * (nothing bound). */
int embstore_tf_bind(const char *ref, Py_ssize_t len, PyObject *source, int dtype, int dim,
                     Py_ssize_t stride, int shard_log2, int chunk_log2, PyObject *patcher) {
  const auto *m = reinterpret_cast<const RowSource *>(source);
  if (m->dtype != dtype || m->dim != dim || m->stride != stride || m->shard_log2 != shard_log2 ||
      m->chunk_log2 != chunk_log2 || m->nshards < 0 || m->nshards > m->cap)
    return -1;
  Py_INCREF(source);
  PyObject *patch = patcher == Py_None ? nullptr : patcher;
  Py_XINCREF(patch);
  auto fresh = std::make_shared<Binding>(source, patch);
  std::shared_ptr<Binding> old;
  {
    std::unique_lock<std::shared_mutex> lock(g_mu);
    auto &slot = (*g_bindings)[std::string(ref, (size_t)len)];
    old.swap(slot);
    slot = fresh;
  }
  return 0;  // `old` is released here, outside g_mu, with the GIL held
}

void embstore_tf_unbind_all(void) {
  std::unordered_map<std::string, std::shared_ptr<Binding>> old;
  {
    std::unique_lock<std::shared_mutex> lock(g_mu);
    old.swap(*g_bindings);
  }
}

long long embstore_tf_bound_count(void) {
  std::shared_lock<std::shared_mutex> lock(g_mu);
  return (long long)g_bindings->size();
}

void embstore_tf_set_resolver(PyObject *fn) {
  Py_XINCREF(fn);
  PyObject *old = g_resolver;
  g_resolver = fn;
  Py_XDECREF(old);
}

}  // extern "C"
