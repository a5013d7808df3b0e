// The host side of a planned call, exposed to Python (fastreg/_plan.py): a cache key over a
// tensor list, one C++ pass to validate and bucket a list the first time it is seen, and the
// work-layout builder of plan.h.
//
// Everything here works on the Python list the caller passed, element by element in C++, so
// that a call whose tensors were seen before costs one read of their metadata and no Python
// code per tensor. Anything unusual (an element that is not a plain dense tensor, a bad dtype,
// a gradient that does not match, memory shared between tensors that are written) is not
// decided here: the list goes to the Python planner, which owns every error message.
#include "fastreg.h"

#include <torch/csrc/autograd/python_variable.h>
#include <torch/csrc/autograd/variable.h>
#include <torch/extension.h>

#include <algorithm>
#include <atomic>
#include <cstdint>
#include <list>
#include <map>
#include <optional>
#include <typeinfo>
#include <utility>
#include <vector>

namespace fastreg {
namespace {

namespace py = pybind11;

// What a call does with its tensors, which decides what must hold for a plan to apply: flags.
enum Kind : int64_t {
  kRead = 0,
  kWritesParams = 1,  // writes the tensors in place
  kGraded = 2,        // works on the tensors that have a .grad only
  kWritesGradsFlag = 4,
  kWritesGrads = kGraded | kWritesGradsFlag,  // reads the tensors with a .grad, writes those grads
  kWritesGraded = kGraded | kWritesParams,    // writes the tensors that have a .grad
};

// A tensor's dtype, device, contiguity and dimensionality in one word of the key.
int64_t meta_word(const c10::TensorImpl* impl, bool contiguous) {
  const auto dtype = static_cast<int64_t>(c10::typeMetaToScalarType(impl->dtype()));
  const auto device_type = static_cast<int64_t>(impl->device_type());
  const int64_t index = impl->device_type() == c10::DeviceType::CPU ? 0 : impl->device().index() + 1;
  return dtype | (device_type << 8) | (index << 16) | (int64_t{contiguous} << 32) | (int64_t{impl->dim() >= 2} << 33);
}

// Whether a plan can describe this tensor: a TensorImpl itself, not a subclass (sparse, nested,
// functorch's wrappers, ... override how their storage is reached), dense, with storage on a real
// device, and no Python dispatch. Its storage can then be read directly: TensorImpl's storage
// accessors are virtual calls, several per tensor on every lookup.
bool plain_impl(const c10::TensorImpl* impl) {
  return typeid(*impl) == typeid(c10::TensorImpl) && impl->layout() == at::kStrided && impl->unsafe_storage() &&
         !impl->key_set().has(c10::DispatchKey::Python) && !impl->is_neg() &&
         impl->device_type() != c10::DeviceType::Meta;
}

// The first element's address, of a tensor plain_impl accepts.
const char* data_of(const c10::TensorImpl* impl) {
  return static_cast<const char*>(impl->unsafe_storage().data()) + impl->storage_offset() * impl->itemsize();
}

// The tensor behind a list element when it is one a plan can describe, else nullptr.
const at::Tensor* plain_tensor(PyObject* object) {
  if (!THPVariable_Check(object)) {
    return nullptr;
  }
  const at::Tensor& t = THPVariable_Unpack(object);
  return plain_impl(t.unsafeGetTensorImpl()) ? &t : nullptr;
}

// The key of a list: for each tensor the words a plan depends on. A plan holds addresses, sizes
// and groupings, not objects, so a list whose words are equal to a planned one's may use that
// plan even if its tensors are new objects (a tensor freed and another allocated at its address
// with its sizes); the tensor object (its TensorImpl) is part of the key only so that a list that
// repeats one tensor never matches a list of two distinct views.
//
// No hash: a lookup compares the list's words with each cached key's, most recently used first,
// as it reads them, and stops at the first differing word (the kind and the length come first).
// Only a list that matches no cached key has its words written out, for put(). A running hash
// over every word would be one long dependent chain of multiplies, which cost as much as reading
// the tensors.
//
// A list's tensors are read in blocks (see read_block). `marks` says where the words of each
// block of each list start, and where the list's end, so that a lookup can compare the blocks of
// a long list on several threads, each from its own mark: most of a lookup is waiting for memory,
// and each core brings its own cache misses in flight.
struct Key {
  std::vector<int64_t> words;
  std::vector<int64_t> marks;
};

// How a walk went: kNotPlain when an element is not a tensor a plan describes, kDiffers when the
// sink refused a word (a Matcher at the first difference); kNeedsGil when a worker thread met an
// element whose type only the Python API can decide (a Tensor subclass), for the calling thread.
enum class Walk { kNotPlain, kDiffers, kDone, kNeedsGil };

// The two ways a list's words are used: written into a key, or compared with a cached one. Each
// runs a list's blocks through blocks(count, walk), where walk(b, sink, gil) emits block b into
// `sink`; gil: whether it runs on the thread that holds the GIL.
struct Writer {
  std::vector<int64_t>& words;
  std::vector<int64_t>& marks;
  size_t size = 0;

  bool operator()(int64_t word) {
    if (size == words.size()) {
      words.resize(std::max<size_t>(256, 2 * size));
    }
    words[size++] = word;
    return true;
  }

  template <typename F>
  Walk blocks(Py_ssize_t count, const F& walk) {
    for (Py_ssize_t b = 0; b < count; ++b) {
      marks.push_back(static_cast<int64_t>(size));
      const Walk walked = walk(b, *this, true);
      if (walked != Walk::kDone) {
        return walked;
      }
    }
    marks.push_back(static_cast<int64_t>(size));
    return Walk::kDone;
  }

  void finish() { words.resize(size); }
};

// Blocks per thread at least: a list of fewer than two such runs is compared on the calling
// thread, where a fork and join would cost more than the second core saves.
constexpr int64_t kBlocksPerThread = 2;

struct Matcher {
  const int64_t* words;  // the cached key's
  const int64_t* at;
  const int64_t* end;
  const int64_t* mark;  // the cached key's next mark, and the end of its marks
  const int64_t* last_mark;

  bool operator()(int64_t word) {
    if (at == end || *at != word) {
      return false;
    }
    ++at;
    return true;
  }
  bool done() const { return at == end; }

  template <typename F>
  Walk blocks(Py_ssize_t count, const F& walk) {
    // The list's length matched, so the cached list had as many blocks; its marks say where.
    if (last_mark - mark < count + 1 || words + *mark != at) {
      return Walk::kDiffers;
    }
    const int64_t* marks = mark;
    mark += count + 1;
    at = words + marks[count];
    // Block b equals the cached words between its two marks, all of them.
    auto compare = [&](int64_t b, bool gil) {
      Matcher block{words, words + marks[b], words + marks[b + 1], nullptr, nullptr};
      const Walk walked = walk(b, block, gil);
      return walked == Walk::kDone && !block.done() ? Walk::kDiffers : walked;
    };
    if (count < 2 * kBlocksPerThread || at::get_num_threads() < 2 || at::in_parallel_region()) {
      for (Py_ssize_t b = 0; b < count; ++b) {
        const Walk walked = compare(b, true);
        if (walked != Walk::kDone) {
          return walked;
        }
      }
      return Walk::kDone;
    }
    // Worker threads read the tensors without the GIL: nothing else runs Python code while the
    // calling thread, which holds it, waits here, so the list and its tensors stay as they are.
    std::atomic<bool> not_plain{false}, differs{false};
    std::vector<uint8_t> needs_gil(count, 0);
    at::parallel_for(0, count, kBlocksPerThread, [&](int64_t first, int64_t last) {
      for (int64_t b = first; b < last && !not_plain.load(std::memory_order_relaxed) &&
                              !differs.load(std::memory_order_relaxed);
           ++b) {
        const Walk walked = compare(b, false);
        if (walked == Walk::kNeedsGil) {
          needs_gil[b] = 1;
        } else if (walked == Walk::kNotPlain) {
          not_plain = true;
        } else if (walked == Walk::kDiffers) {
          differs = true;
        }
      }
    });
    for (Py_ssize_t b = 0; b < count && !not_plain && !differs; ++b) {
      if (needs_gil[b]) {
        const Walk walked = compare(b, true);
        not_plain = walked == Walk::kNotPlain;
        differs = walked == Walk::kDiffers;
      }
    }
    return not_plain ? Walk::kNotPlain : differs ? Walk::kDiffers : Walk::kDone;
  }
};

template <typename Sink>
bool emit_tensor(Sink& sink, const c10::TensorImpl* impl) {
  const bool contiguous = impl->is_contiguous();
  if (!(sink(reinterpret_cast<int64_t>(impl)) && sink(reinterpret_cast<int64_t>(data_of(impl))) &&
        sink(impl->numel()) && sink(meta_word(impl, contiguous)) && sink(impl->dim() >= 2 ? impl->size(0) : 1))) {
    return false;
  }
  if (!contiguous) {
    // Staged through copies, but its footprint decides what it may overlap.
    if (!sink(impl->dim())) {
      return false;
    }
    for (int64_t d = 0; d < impl->dim(); ++d) {
      if (!(sink(impl->size(d)) && sink(impl->stride(d)))) {
        return false;
      }
    }
  }
  return true;
}

// One element of a list, as far as its key goes: its TensorImpl and, for a call on gradients,
// its .grad's (nullptr: none).
struct Slot {
  const c10::TensorImpl* impl;
  const c10::TensorImpl* grad;
};

inline void prefetch_lines(const void* address, int lines) {
  for (int k = 0; k < lines; ++k) {
    __builtin_prefetch(static_cast<const char*>(address) + 64 * k);
  }
}

// Tensors read per block (see read_block): their lines, about a dozen each (200 KB), stay in L2
// from one pass to the next.
constexpr Py_ssize_t kBlock = 256;

// What a key reads of a tensor sits at the end of a chain of pointers: the Python object, its
// TensorImpl, that one's storage and autograd meta, the .grad's TensorImpl, its storage. The
// links of one tensor depend on each other; those of different tensors do not. So a block of
// tensors is read in passes, one link per pass over the block, each prefetching the next: many
// cache misses are then in flight at once, where a walk tensor by tensor waits for each in turn
// (on 10,000 tensors, most of a lookup's time). kNotPlain when an element is not a tensor a plan
// describes; without the GIL (gil false), kNeedsGil at an element that is not exactly a Tensor or
// a Parameter, since only the Python API can say whether it is a tensor.
Walk read_block(PyObject* list, Py_ssize_t begin, Py_ssize_t end, bool graded, bool gil, Slot* slots) {
  const Py_ssize_t n = end - begin;
  for (Py_ssize_t i = 0; i < n; ++i) {
    PyObject* object = PyList_GET_ITEM(list, begin + i);
    if (!THPVariable_CheckExact(object)) {
      if (!gil) {
        return Walk::kNeedsGil;
      }
      if (!THPVariable_Check(object)) {
        return Walk::kNotPlain;
      }
    }
    const c10::TensorImpl* impl = THPVariable_Unpack(object).unsafeGetTensorImpl();
    prefetch_lines(impl, 3);  // the fields a key reads span a TensorImpl's first three lines
    slots[i] = {impl, nullptr};
  }
  for (Py_ssize_t i = 0; i < n; ++i) {
    const c10::TensorImpl* impl = slots[i].impl;
    if (!plain_impl(impl)) {
      return Walk::kNotPlain;
    }
    prefetch_lines(impl->unsafe_storage().unsafeGetStorageImpl(), 2);
    if (graded && impl->autograd_meta() != nullptr) {
      __builtin_prefetch(&static_cast<const torch::autograd::AutogradMeta*>(impl->autograd_meta())->grad_);
    }
  }
  if (!graded) {
    return Walk::kDone;
  }
  for (Py_ssize_t i = 0; i < n; ++i) {
    const auto* meta = static_cast<const torch::autograd::AutogradMeta*>(slots[i].impl->autograd_meta());
    if (meta != nullptr && meta->grad_.defined()) {
      slots[i].grad = meta->grad_.unsafeGetTensorImpl();
      prefetch_lines(slots[i].grad, 3);
    }
  }
  for (Py_ssize_t i = 0; i < n; ++i) {
    const c10::TensorImpl* grad = slots[i].grad;
    if (grad == nullptr) {
      continue;
    }
    if (!plain_impl(grad) || grad->sizes() != slots[i].impl->sizes()) {
      return Walk::kNotPlain;
    }
    prefetch_lines(grad->unsafe_storage().unsafeGetStorageImpl(), 2);
  }
  return Walk::kDone;
}

// The words of a list's key into `sink`: its length, then its blocks.
template <typename Sink>
Walk walk_list(PyObject* list, bool graded, Sink& sink) {
  const Py_ssize_t n = PyList_GET_SIZE(list);
  if (!sink(static_cast<int64_t>(n))) {
    return Walk::kDiffers;
  }
  return sink.blocks((n + kBlock - 1) / kBlock, [&](Py_ssize_t b, auto& block_sink, bool gil) {
    const Py_ssize_t begin = b * kBlock;
    const Py_ssize_t end = std::min(n, begin + kBlock);
    Slot slots[kBlock];
    const Walk read = read_block(list, begin, end, graded, gil, slots);
    if (read != Walk::kDone) {
      return read;
    }
    for (Py_ssize_t i = 0; i < end - begin; ++i) {
      if (!emit_tensor(block_sink, slots[i].impl)) {
        return Walk::kDiffers;
      }
      if (graded && !(slots[i].grad == nullptr ? block_sink(0) : emit_tensor(block_sink, slots[i].grad))) {
        return Walk::kDiffers;
      }
    }
    return Walk::kDone;
  });
}

// The key of a call of `kind` over `list`, with the optimizer-state lists a plan may also address
// (exp_avg, step, ...; or nullptr), into `sink`.
template <typename Sink>
Walk walk_key(PyObject* list, int64_t kind, PyObject* extra, Sink& sink) {
  if (!sink(kind)) {
    return Walk::kDiffers;
  }
  Walk walked = walk_list(list, (kind & kGraded) != 0, sink);
  if (walked != Walk::kDone) {
    return walked;
  }
  const Py_ssize_t lists = extra == nullptr ? 0 : PyList_GET_SIZE(extra);
  if (!sink(static_cast<int64_t>(lists))) {
    return Walk::kDiffers;
  }
  for (Py_ssize_t l = 0; l < lists; ++l) {
    PyObject* more = PyList_GET_ITEM(extra, l);
    if (!PyList_Check(more)) {
      return Walk::kNotPlain;
    }
    walked = walk_list(more, false, sink);
    if (walked != Walk::kDone) {
      return walked;
    }
  }
  return Walk::kDone;
}

// A bounded, least-recently-used map from keys to plans (Python objects). Lookups hold the GIL,
// as every call of this module does, so the cache needs no lock of its own.
class PlanCache {
 public:
  explicit PlanCache(int64_t capacity) : capacity_(std::max<int64_t>(capacity, 1)) {}

  // (plan, None) when a plan of an equal key is cached; (None, key) when none is, for put();
  // (None, None) when the list is not one a plan describes.
  py::tuple lookup(const py::list& tensors, int64_t kind, const std::optional<py::list>& extra) {
    PyObject* more = extra.has_value() ? extra->ptr() : nullptr;
    for (auto it = entries_.begin(); it != entries_.end(); ++it) {
      const Key& cached = it->first;
      Matcher matcher{cached.words.data(), cached.words.data(), cached.words.data() + cached.words.size(),
                      cached.marks.data(), cached.marks.data() + cached.marks.size()};
      const Walk walked = walk_key(tensors.ptr(), kind, more, matcher);
      if (walked == Walk::kNotPlain) {
        return py::make_tuple(py::none(), py::none());
      }
      if (walked == Walk::kDone && matcher.done()) {
        entries_.splice(entries_.begin(), entries_, it);
        ++hits_;
        return py::make_tuple(entries_.front().second, py::none());
      }
    }
    Key key;
    Writer writer{key.words, key.marks};
    if (walk_key(tensors.ptr(), kind, more, writer) == Walk::kNotPlain) {
      return py::make_tuple(py::none(), py::none());
    }
    writer.finish();
    ++misses_;
    return py::make_tuple(py::none(), py::cast(std::move(key)));
  }

  void put(const Key& key, py::object plan) {
    entries_.emplace_front(key, std::move(plan));
    while (static_cast<int64_t>(entries_.size()) > capacity_) {
      entries_.pop_back();
    }
  }

  void clear() { entries_.clear(); }
  int64_t size() const { return static_cast<int64_t>(entries_.size()); }
  int64_t hits() const { return hits_; }
  int64_t misses() const { return misses_; }

 private:
  int64_t capacity_;
  std::list<std::pair<Key, py::object>> entries_;
  int64_t hits_ = 0;
  int64_t misses_ = 0;
};

bool supported_dtype(at::ScalarType dtype) {
  return dtype == at::kFloat || dtype == at::kDouble || dtype == at::kHalf || dtype == at::kBFloat16;
}

// Address range [begin, end) of the bytes a non-empty tensor can touch.
std::pair<uintptr_t, uintptr_t> span_of(const at::Tensor& t) {
  const c10::TensorImpl* impl = t.unsafeGetTensorImpl();
  int64_t extent = 1;
  if (impl->is_contiguous()) {
    extent = impl->numel();
  } else {
    for (int64_t d = 0; d < impl->dim(); ++d) {
      extent += (impl->size(d) - 1) * std::abs(impl->stride(d));
    }
  }
  const auto begin = reinterpret_cast<uintptr_t>(data_of(impl));
  return {begin, begin + static_cast<uintptr_t>(extent * impl->itemsize())};
}

bool any_overlap(std::vector<std::pair<uintptr_t, uintptr_t>>& spans) {
  std::sort(spans.begin(), spans.end());
  for (size_t i = 1; i < spans.size(); ++i) {
    if (spans[i].first < spans[i - 1].second) {
      return true;
    }
  }
  return false;
}

// First sight of a list: check every tensor, pick the ones the call works on, and split them into
// (device, dtype) buckets. Returns None when the Python planner must decide (an error to report,
// or a case this pass does not settle, such as written tensors whose address ranges intersect),
// else a dict:
//   used:     positions in `tensors` of the tensors the call works on (all, or those with a .grad)
//   buckets:  per (device, dtype) in order of first appearance: (device, dtype, positions in
//             `used`, whether all are contiguous)
//   extents:  int64 [len(used), 2]: numel and rows (shape[0] of 2+-dim tensors, else 1)
py::object scan(const py::list& tensors, int64_t kind) {
  const Py_ssize_t n = PyList_GET_SIZE(tensors.ptr());
  std::vector<const at::Tensor*> used_tensors;
  std::vector<int64_t> used;
  used_tensors.reserve(n);
  used.reserve(n);
  std::vector<const c10::TensorImpl*> impls;
  impls.reserve(n);
  for (Py_ssize_t i = 0; i < n; ++i) {
    const at::Tensor* t = plain_tensor(PyList_GET_ITEM(tensors.ptr(), i));
    if (t == nullptr || !supported_dtype(t->scalar_type())) {
      return py::none();
    }
    impls.push_back(t->unsafeGetTensorImpl());
    if (kind & kGraded) {
      const at::Tensor& g = t->grad();
      if (!g.defined()) {
        continue;
      }
      if (!plain_impl(g.unsafeGetTensorImpl()) || g.scalar_type() != t->scalar_type() || g.sizes() != t->sizes() ||
          g.device() != t->device()) {
        return py::none();
      }
    }
    used_tensors.push_back(t);
    used.push_back(i);
  }
  std::sort(impls.begin(), impls.end());
  if (std::adjacent_find(impls.begin(), impls.end()) != impls.end()) {
    return py::none();  // one tensor listed twice
  }
  if (kind & (kWritesParams | kWritesGradsFlag)) {
    std::vector<std::pair<uintptr_t, uintptr_t>> spans;
    spans.reserve(used_tensors.size());
    for (const at::Tensor* t : used_tensors) {
      const at::Tensor& written = (kind & kWritesGradsFlag) ? t->grad() : *t;
      if (written.numel() > 0) {
        spans.push_back(span_of(written));
      }
    }
    if (any_overlap(spans)) {
      return py::none();
    }
  }

  struct Bucket {
    at::Device device;
    at::ScalarType dtype;
    std::vector<int64_t> members;
    bool contiguous;
  };
  std::vector<Bucket> buckets;
  const int64_t m = static_cast<int64_t>(used_tensors.size());
  at::Tensor extents = at::empty({m, 2}, at::TensorOptions().dtype(at::kLong));
  int64_t* e = extents.data_ptr<int64_t>();
  for (int64_t k = 0; k < m; ++k) {
    const at::Tensor& t = *used_tensors[k];
    const plan::Extent extent = plan::extent_of(t);
    e[2 * k] = extent.numel;
    e[2 * k + 1] = extent.rows;
    bool contiguous = t.is_contiguous();
    if (kind & kWritesGradsFlag) {
      contiguous = contiguous && t.grad().is_contiguous();
    }
    auto it = std::find_if(buckets.begin(), buckets.end(), [&](const Bucket& b) {
      return b.device == t.device() && b.dtype == t.scalar_type();
    });
    if (it == buckets.end()) {
      buckets.push_back({t.device(), t.scalar_type(), {}, true});
      it = buckets.end() - 1;
    }
    it->members.push_back(k);
    it->contiguous = it->contiguous && contiguous;
  }
  py::list out_buckets;
  for (const Bucket& b : buckets) {
    at::Tensor members = at::tensor(b.members, at::TensorOptions().dtype(at::kLong));
    out_buckets.append(py::make_tuple(py::cast(b.device), py::cast(b.dtype), members, b.contiguous));
  }
  py::dict out;
  out["used"] = at::tensor(used, at::TensorOptions().dtype(at::kLong));
  out["buckets"] = out_buckets;
  out["extents"] = extents;
  return out;
}

at::Tensor layout(const at::Tensor& extents, bool row_groups, int64_t lists, int64_t chunk, int64_t max_groups) {
  TORCH_CHECK(extents.dim() == 2 && extents.size(1) == 2 && extents.scalar_type() == at::kLong && extents.is_cpu(),
              "fastreg: extents must be an int64 CPU tensor of shape [T, 2]");
  const at::Tensor e = extents.contiguous();
  const int64_t* words = e.data_ptr<int64_t>();
  std::vector<plan::Extent> list(e.size(0));
  for (int64_t t = 0; t < e.size(0); ++t) {
    list[t] = {words[2 * t], words[2 * t + 1]};
  }
  return plan::build(list, row_groups, lists, chunk, max_groups <= 0 ? plan::kUnlimitedGroups : max_groups);
}

// Fills pointer row `list` of a host table with the data addresses of `tensors` (a Python list).
void set_ptrs(at::Tensor& table, int64_t list, const py::list& tensors) {
  std::vector<at::Tensor> unpacked;
  unpacked.reserve(PyList_GET_SIZE(tensors.ptr()));
  for (Py_ssize_t i = 0; i < PyList_GET_SIZE(tensors.ptr()); ++i) {
    PyObject* object = PyList_GET_ITEM(tensors.ptr(), i);
    TORCH_CHECK_TYPE(THPVariable_Check(object), "fastreg: set_ptrs takes a list of tensors");
    unpacked.push_back(THPVariable_Unpack(object));
  }
  plan::set_ptrs(table, list, unpacked);
}

}  // namespace
}  // namespace fastreg

PYBIND11_MODULE(TORCH_EXTENSION_NAME, m) {
  namespace py = pybind11;
  using fastreg::Key;
  using fastreg::PlanCache;
  m.doc() = "fastreg's planner: cache keys, first-sight checks and the work layout of a call";
  m.attr("READ") = static_cast<int64_t>(fastreg::kRead);
  m.attr("WRITES_PARAMS") = static_cast<int64_t>(fastreg::kWritesParams);
  m.attr("WRITES_GRADS") = static_cast<int64_t>(fastreg::kWritesGrads);
  m.attr("WRITES_GRADED") = static_cast<int64_t>(fastreg::kWritesGraded);
  py::class_<Key>(m, "Key");
  py::class_<PlanCache>(m, "PlanCache")
      .def(py::init<int64_t>(), py::arg("capacity"))
      .def("lookup", &PlanCache::lookup, py::arg("tensors"), py::arg("kind"), py::arg("extra") = py::none())
      .def("put", &PlanCache::put, py::arg("key"), py::arg("plan"))
      .def("clear", &PlanCache::clear)
      .def("__len__", &PlanCache::size)
      .def_property_readonly("hits", &PlanCache::hits)
      .def_property_readonly("misses", &PlanCache::misses);
  m.def("scan", &fastreg::scan, py::arg("tensors"), py::arg("kind"));
  m.def("layout", &fastreg::layout, py::arg("extents"), py::arg("row_groups"), py::arg("lists"),
        py::arg("chunk") = fastreg::plan::kDefaultChunk, py::arg("max_groups") = 0);
  m.def("set_ptrs", &fastreg::set_ptrs, py::arg("table"), py::arg("list"), py::arg("tensors"));
  // The CPU kernels over a table (fastreg_cpu.cpp), without torch.ops' per-tensor argument work.
  m.def("norms", &fastreg::cpu::planned_norms, py::arg("table"), py::arg("dtype"));
  m.def("value", &fastreg::cpu::planned_value, py::arg("table"), py::arg("dtype"), py::arg("l1"), py::arg("l2"),
        py::arg("group_lasso"));
  m.def("add_grad_", &fastreg::cpu::planned_add_grad, py::arg("table"), py::arg("dtype"), py::arg("l1"),
        py::arg("l2"), py::arg("group_lasso"));
  m.def("decay_", &fastreg::cpu::planned_decay, py::arg("table"), py::arg("dtype"), py::arg("lr"),
        py::arg("lr_tensor"), py::arg("l1"), py::arg("l2"), py::arg("group_lasso"));
  // The fused optimizer steps (fastreg_optim.cpp), for fastreg/fused.py.
  m.def("adam_step_", &fastreg::cpu::planned_adam_step, py::arg("table"), py::arg("dtype"), py::arg("lr"),
        py::arg("lr_tensor"), py::arg("beta1"), py::arg("beta2"), py::arg("eps"), py::arg("weight_decay"),
        py::arg("decoupled"), py::arg("amsgrad"), py::arg("maximize"), py::arg("grad_scale"), py::arg("found_inf"),
        py::arg("l1"), py::arg("l2"), py::arg("group_lasso"), py::arg("penalty_l2"), py::arg("track"));
  m.def("sgd_step_", &fastreg::cpu::planned_sgd_step, py::arg("table"), py::arg("dtype"), py::arg("lr"),
        py::arg("lr_tensor"), py::arg("momentum"), py::arg("dampening"), py::arg("weight_decay"), py::arg("nesterov"),
        py::arg("maximize"), py::arg("first"), py::arg("grad_scale"), py::arg("found_inf"), py::arg("l1"),
        py::arg("l2"), py::arg("group_lasso"), py::arg("penalty_l2"), py::arg("track"));
}
