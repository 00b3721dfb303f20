/* An emulated CUDA driver (libcuda.so.1) for machines without a GPU.
 *
 * It serves the part of the driver API that Torpor calls, through the very
 * `cuda-bindings` the daemon and the agent use on a GPU (they find every
 * function with cuGetProcAddress), so their argument marshalling, their
 * contexts, their streams and events and their VMM bookkeeping run here:
 *
 * - Device memory is a memfd per allocation (cuMemCreate), exported and
 *   imported as its fd, mapped with mmap into ranges reserved with PROT_NONE.
 *   The CPU can't touch it there (as on a GPU host); the emulated device (the
 *   stream threads) reaches it through a second mapping of its own. Memory is
 *   in use while any process holds or maps it (emulated.h), so "freed" means
 *   what it means on a GPU.
 * - Streams are threads: copies run asynchronously, in stream order; events
 *   complete when the stream reaches them. CUDAEMU_DELAY_US slows each
 *   operation down, so work not waited for shows.
 * - It is strict where the documentation is: offsets and sizes aligned to the
 *   granularity, cuMemMap of a whole allocation at offset 0, access set on
 *   mapped ranges only, no unmap or address free with mappings or queued work
 *   on them, a current context where the driver needs one, registration
 *   rules of pinned host memory. A copy that touches device memory not mapped
 *   and accessible is a fault: like a GPU's, it is sticky, every later call
 *   returns CUDA_ERROR_ILLEGAL_ADDRESS, and it is reported on stderr.
 *
 * It runs no kernels (cuModuleLoad* and cuLaunchKernel are absent, as
 * CUDA_ERROR_NOT_FOUND from cuGetProcAddress).
 *
 * Configuration (environment): CUDAEMU_DEVICES (1), CUDAEMU_MEMORY (bytes per
 * device, 1 GiB), CUDAEMU_NODE (a name that keeps emulated nodes apart),
 * CUDAEMU_DELAY_US (0), CUDAEMU_PEER (1: devices reach each other's memory),
 * CUDAEMU_VERSION (13000), CUDAEMU_TRACE (1: each call on stderr),
 * CUDAEMU_HOST_ACCESS (1: the CPU may touch device memory at its device
 * address, for a test engine computing on the CPU; by default it faults, as a
 * device address does on a GPU host).
 */
#include "emulated.h"

#include <cuda.h>
#include <errno.h>
#include <fcntl.h>
#include <pthread.h>
#include <stdarg.h>
#include <stdint.h>
#include <sys/mman.h>

#define GRANULARITY (2ULL << 20)

/* -- state ---------------------------------------------------------------- */

struct ctx {
  int device;
};

struct alloc {
  int fd; /* -1 once released */
  size_t size;
  int device;
  int exportable;
  int maps;
  struct alloc *next;
};

struct reservation {
  uintptr_t base;
  size_t size;
  struct reservation *next;
};

struct mapping {
  uintptr_t base;
  size_t size;
  struct alloc *alloc;
  int access[EMU_MAX_DEVICES]; /* PROT_*, as each device sees it */
  char *shadow;  /* where the emulated device reaches the same memory */
  struct mapping *next;
};

struct hostmem {
  uintptr_t base;
  size_t size;
  int allocated; /* cuMemHostAlloc (else cuMemHostRegister) */
  int devicemap; /* registered or allocated with the DEVICEMAP flag */
  struct hostmem *next;
};

enum op_kind { OP_COPY, OP_EVENT };

struct op {
  enum op_kind kind;
  uintptr_t dst, src;
  size_t size;
  int dst_device, src_device; /* 1 if the address must be device memory */
  struct event *event;
  unsigned long long generation;
  struct op *next;
};

struct stream {
  int device;
  pthread_t thread;
  pthread_mutex_t lock;
  pthread_cond_t cond;
  struct op *head, *tail;
  int busy, stop;
  struct stream *next;
};

struct event {
  int device;
  unsigned long long recorded, reached;
  struct event *next;
};

static pthread_mutex_t G = PTHREAD_MUTEX_INITIALIZER;
static pthread_cond_t progress = PTHREAD_COND_INITIALIZER; /* events reached, queues drained */
static int initialised;
static CUresult sticky;
static struct ctx contexts[EMU_MAX_DEVICES];
static int retained[EMU_MAX_DEVICES];
static struct alloc *allocs;
static struct reservation *reservations;
static struct mapping *mappings;
static struct hostmem *hostmems;
static struct stream *streams;
static struct event *events;
static __thread struct ctx *stack[16];
static __thread int depth = -1; /* stack[depth] is current */

static void trace(const char *fmt, ...) {
  static int on = -1;
  if (on < 0) on = getenv("CUDAEMU_TRACE") && atoi(getenv("CUDAEMU_TRACE"));
  if (!on) return;
  va_list ap;
  va_start(ap, fmt);
  fprintf(stderr, "cudaemu[%d]: ", getpid());
  vfprintf(stderr, fmt, ap);
  fputc('\n', stderr);
  va_end(ap);
}

static void fault(const char *fmt, ...) {
  va_list ap;
  va_start(ap, fmt);
  fprintf(stderr, "cudaemu[%d]: FAULT (CUDA_ERROR_ILLEGAL_ADDRESS from now on): ", getpid());
  vfprintf(stderr, fmt, ap);
  fputc('\n', stderr);
  va_end(ap);
  sticky = CUDA_ERROR_ILLEGAL_ADDRESS;
}

#define ENTER(name)                                   \
  trace("%s", name);                                  \
  if (!initialised) return CUDA_ERROR_NOT_INITIALIZED; \
  if (sticky) return sticky

#define NEED_CONTEXT() \
  if (depth < 0 || !stack[depth]) return CUDA_ERROR_INVALID_CONTEXT

static int valid_device(int d) { return d >= 0 && d < emu_devices(); }

static struct ctx *current(void) { return depth >= 0 ? stack[depth] : NULL; }

/* The mapping holding [p, p + n) whole, or NULL (under G). */
static struct mapping *mapping_of(uintptr_t p, size_t n) {
  for (struct mapping *m = mappings; m; m = m->next)
    if (m->base <= p && p + n <= m->base + m->size) return m;
  return NULL;
}

static struct reservation *reservation_of(uintptr_t p, size_t n) {
  for (struct reservation *r = reservations; r; r = r->next)
    if (r->base <= p && p + n <= r->base + r->size) return r;
  return NULL;
}

static int is_alloc(struct alloc *a) {
  for (struct alloc *x = allocs; x; x = x->next)
    if (x == a) return 1;
  return 0;
}

static int is_stream(struct stream *s) {
  for (struct stream *x = streams; x; x = x->next)
    if (x == s) return 1;
  return 0;
}

static int is_event(struct event *e) {
  for (struct event *x = events; x; x = x->next)
    if (x == e) return 1;
  return 0;
}

static void drop_alloc(struct alloc *a) {
  struct alloc **at = &allocs;
  while (*at && *at != a) at = &(*at)->next;
  if (*at) *at = a->next;
  free(a);
}

/* -- streams -------------------------------------------------------------- */

/* Where the emulated device `device` (the copying stream's) reads or writes
 * [p, p + n) of device memory, or NULL after a fault (under G). */
static char *device_at(int device, uintptr_t p, size_t n, int prot, const char *what,
                       const struct op *op) {
  struct mapping *m = mapping_of(p, n);
  if (!m) {
    fault("copy %s 0x%lx (+%zu): not mapped device memory (copy %zu bytes 0x%lx -> 0x%lx)", what,
          (unsigned long)p, n, op->size, (unsigned long)op->src, (unsigned long)op->dst);
    return NULL;
  }
  if ((m->access[device] & prot) != prot) {
    fault("copy %s 0x%lx on device %d: mapped without that device's access (cuMemSetAccess)",
          what, (unsigned long)p, device);
    return NULL;
  }
  return m->shadow + (p - m->base);
}

/* Whether this process's CPU may touch device memory at its device address.
 * A GPU's memory is not the CPU's: by default a device address faults on the
 * CPU (SIGSEGV), as it does on a GPU host. CUDAEMU_HOST_ACCESS=1 opens it, for
 * a test engine that computes on the CPU in place of the GPU. */
static int host_access(void) {
  const char *v = getenv("CUDAEMU_HOST_ACCESS");
  return v && atoi(v);
}

static void *stream_main(void *arg) {
  struct stream *s = arg;
  const char *delay = getenv("CUDAEMU_DELAY_US");
  int us = delay ? atoi(delay) : 0;
  pthread_mutex_lock(&s->lock);
  for (;;) {
    while (!s->head && !s->stop) pthread_cond_wait(&s->cond, &s->lock);
    if (!s->head) break;
    struct op *op = s->head;
    s->busy = 1;
    pthread_mutex_unlock(&s->lock);
    if (us) usleep(us);
    pthread_mutex_lock(&G);
    if (op->kind == OP_COPY && !sticky) {
      char *dst = (char *)op->dst, *src = (char *)op->src;
      if (op->dst_device) dst = device_at(s->device, op->dst, op->size, PROT_WRITE, "to", op);
      if (dst && op->src_device)
        src = device_at(s->device, op->src, op->size, PROT_READ, "from", op);
      if (dst && src) memmove(dst, src, op->size);
    } else if (op->kind == OP_EVENT) {
      if (op->event->reached < op->generation) op->event->reached = op->generation;
    }
    pthread_mutex_unlock(&G);
    pthread_mutex_lock(&s->lock);
    s->head = op->next;
    if (!s->head) s->tail = NULL;
    s->busy = 0;
    pthread_mutex_unlock(&s->lock);
    free(op);
    /* (G before s->lock everywhere: never take G holding s->lock) */
    pthread_mutex_lock(&G);
    pthread_cond_broadcast(&progress);
    pthread_mutex_unlock(&G);
    pthread_mutex_lock(&s->lock);
  }
  pthread_mutex_unlock(&s->lock);
  return NULL;
}

static void enqueue(struct stream *s, struct op *op) {
  op->next = NULL;
  pthread_mutex_lock(&s->lock);
  if (s->tail)
    s->tail->next = op;
  else
    s->head = op;
  s->tail = op;
  pthread_cond_signal(&s->cond);
  pthread_mutex_unlock(&s->lock);
}

static int idle(struct stream *s) {
  pthread_mutex_lock(&s->lock);
  int done = !s->head && !s->busy;
  pthread_mutex_unlock(&s->lock);
  return done;
}

/* Wait (under G, which it lets go while waiting) until s has no work. */
static void drain(struct stream *s) {
  while (!idle(s)) pthread_cond_wait(&progress, &G);
}

/* Whether any stream has a copy queued that touches [p, p + n). */
static int queued_on(uintptr_t p, size_t n) {
  for (struct stream *s = streams; s; s = s->next) {
    pthread_mutex_lock(&s->lock);
    for (struct op *op = s->head; op; op = op->next) {
      if (op->kind != OP_COPY) continue;
      if ((op->dst < p + n && p < op->dst + op->size) ||
          (op->src < p + n && p < op->src + op->size)) {
        pthread_mutex_unlock(&s->lock);
        return 1;
      }
    }
    pthread_mutex_unlock(&s->lock);
  }
  return 0;
}

/* -- errors, init, version ------------------------------------------------ */

static const struct {
  CUresult code;
  const char *name, *text;
} errors[] = {
    {CUDA_SUCCESS, "CUDA_SUCCESS", "no error"},
    {CUDA_ERROR_INVALID_VALUE, "CUDA_ERROR_INVALID_VALUE", "invalid argument"},
    {CUDA_ERROR_OUT_OF_MEMORY, "CUDA_ERROR_OUT_OF_MEMORY", "out of memory"},
    {CUDA_ERROR_NOT_INITIALIZED, "CUDA_ERROR_NOT_INITIALIZED", "initialization error"},
    {CUDA_ERROR_NO_DEVICE, "CUDA_ERROR_NO_DEVICE", "no CUDA-capable device is detected"},
    {CUDA_ERROR_INVALID_DEVICE, "CUDA_ERROR_INVALID_DEVICE", "invalid device ordinal"},
    {CUDA_ERROR_INVALID_CONTEXT, "CUDA_ERROR_INVALID_CONTEXT", "invalid device context"},
    {CUDA_ERROR_INVALID_HANDLE, "CUDA_ERROR_INVALID_HANDLE", "invalid resource handle"},
    {CUDA_ERROR_NOT_FOUND, "CUDA_ERROR_NOT_FOUND", "named symbol not found"},
    {CUDA_ERROR_NOT_READY, "CUDA_ERROR_NOT_READY", "device not ready"},
    {CUDA_ERROR_ILLEGAL_ADDRESS, "CUDA_ERROR_ILLEGAL_ADDRESS",
     "an illegal memory access was encountered"},
    {CUDA_ERROR_HOST_MEMORY_ALREADY_REGISTERED, "CUDA_ERROR_HOST_MEMORY_ALREADY_REGISTERED",
     "part or all of the requested memory range is already mapped"},
    {CUDA_ERROR_HOST_MEMORY_NOT_REGISTERED, "CUDA_ERROR_HOST_MEMORY_NOT_REGISTERED",
     "pointer does not correspond to a registered memory region"},
    {CUDA_ERROR_NOT_PERMITTED, "CUDA_ERROR_NOT_PERMITTED", "operation not permitted"},
    {CUDA_ERROR_NOT_SUPPORTED, "CUDA_ERROR_NOT_SUPPORTED", "operation not supported"},
};

CUresult cuGetErrorName(CUresult error, const char **pStr) {
  for (size_t i = 0; i < sizeof errors / sizeof *errors; i++)
    if (errors[i].code == error) {
      *pStr = errors[i].name;
      return CUDA_SUCCESS;
    }
  *pStr = NULL;
  return CUDA_ERROR_INVALID_VALUE;
}

CUresult cuGetErrorString(CUresult error, const char **pStr) {
  for (size_t i = 0; i < sizeof errors / sizeof *errors; i++)
    if (errors[i].code == error) {
      *pStr = errors[i].text;
      return CUDA_SUCCESS;
    }
  *pStr = NULL;
  return CUDA_ERROR_INVALID_VALUE;
}

CUresult cuInit(unsigned int Flags) {
  trace("cuInit");
  if (Flags != 0) return CUDA_ERROR_INVALID_VALUE;
  if (emu_devices() == 0) return CUDA_ERROR_NO_DEVICE;
  pthread_mutex_lock(&G);
  if (!initialised)
    for (int d = 0; d < EMU_MAX_DEVICES; d++) contexts[d].device = d;
  initialised = 1;
  pthread_mutex_unlock(&G);
  return CUDA_SUCCESS;
}

CUresult cuDriverGetVersion(int *driverVersion) {
  if (!driverVersion) return CUDA_ERROR_INVALID_VALUE;
  const char *v = getenv("CUDAEMU_VERSION");
  *driverVersion = v ? atoi(v) : 13000;
  return CUDA_SUCCESS;
}

/* -- devices and contexts ------------------------------------------------- */

CUresult cuDeviceGetCount(int *count) {
  ENTER("cuDeviceGetCount");
  *count = emu_devices();
  return CUDA_SUCCESS;
}

CUresult cuDeviceGet(CUdevice *device, int ordinal) {
  ENTER("cuDeviceGet");
  if (!valid_device(ordinal)) return CUDA_ERROR_INVALID_DEVICE;
  *device = ordinal;
  return CUDA_SUCCESS;
}

CUresult cuDeviceGetName(char *name, int len, CUdevice dev) {
  ENTER("cuDeviceGetName");
  if (!valid_device(dev)) return CUDA_ERROR_INVALID_DEVICE;
  if (!name || len <= 0) return CUDA_ERROR_INVALID_VALUE;
  snprintf(name, (size_t)len, "Torpor emulated GPU");
  return CUDA_SUCCESS;
}

CUresult cuDeviceGetUuid(CUuuid *uuid, CUdevice dev) {
  ENTER("cuDeviceGetUuid");
  if (!valid_device(dev)) return CUDA_ERROR_INVALID_DEVICE;
  emu_uuid(dev, (unsigned char *)uuid->bytes);
  return CUDA_SUCCESS;
}

CUresult cuDeviceTotalMem(size_t *bytes, CUdevice dev) {
  ENTER("cuDeviceTotalMem");
  if (!valid_device(dev)) return CUDA_ERROR_INVALID_DEVICE;
  *bytes = emu_total();
  return CUDA_SUCCESS;
}

CUresult cuDeviceGetAttribute(int *pi, CUdevice_attribute attrib, CUdevice dev) {
  ENTER("cuDeviceGetAttribute");
  if (!valid_device(dev)) return CUDA_ERROR_INVALID_DEVICE;
  switch (attrib) {
    case CU_DEVICE_ATTRIBUTE_COMPUTE_CAPABILITY_MAJOR: *pi = 9; break;
    case CU_DEVICE_ATTRIBUTE_COMPUTE_CAPABILITY_MINOR: *pi = 0; break;
    case CU_DEVICE_ATTRIBUTE_UNIFIED_ADDRESSING: *pi = 1; break;
    case CU_DEVICE_ATTRIBUTE_CAN_MAP_HOST_MEMORY: *pi = 1; break;
    case CU_DEVICE_ATTRIBUTE_VIRTUAL_MEMORY_MANAGEMENT_SUPPORTED: *pi = 1; break;
    case CU_DEVICE_ATTRIBUTE_HANDLE_TYPE_POSIX_FILE_DESCRIPTOR_SUPPORTED: *pi = 1; break;
    case CU_DEVICE_ATTRIBUTE_CAN_USE_HOST_POINTER_FOR_REGISTERED_MEM: *pi = 1; break;
    case CU_DEVICE_ATTRIBUTE_MULTIPROCESSOR_COUNT: *pi = 4; break;
    default: *pi = 0;
  }
  return CUDA_SUCCESS;
}

CUresult cuDeviceCanAccessPeer(int *canAccessPeer, CUdevice dev, CUdevice peerDev) {
  ENTER("cuDeviceCanAccessPeer");
  if (!valid_device(dev) || !valid_device(peerDev)) return CUDA_ERROR_INVALID_DEVICE;
  const char *p = getenv("CUDAEMU_PEER");
  *canAccessPeer = dev != peerDev && p && atoi(p);
  return CUDA_SUCCESS;
}

CUresult cuDevicePrimaryCtxRetain(CUcontext *pctx, CUdevice dev) {
  ENTER("cuDevicePrimaryCtxRetain");
  if (!valid_device(dev)) return CUDA_ERROR_INVALID_DEVICE;
  pthread_mutex_lock(&G);
  retained[dev]++;
  pthread_mutex_unlock(&G);
  *pctx = (CUcontext)&contexts[dev];
  return CUDA_SUCCESS;
}

CUresult cuDevicePrimaryCtxRelease(CUdevice dev) {
  ENTER("cuDevicePrimaryCtxRelease");
  if (!valid_device(dev)) return CUDA_ERROR_INVALID_DEVICE;
  pthread_mutex_lock(&G);
  CUresult r = retained[dev] > 0 ? CUDA_SUCCESS : CUDA_ERROR_INVALID_CONTEXT;
  if (retained[dev] > 0) retained[dev]--;
  pthread_mutex_unlock(&G);
  return r;
}

static int valid_ctx(CUcontext ctx) {
  struct ctx *c = (struct ctx *)ctx;
  return c >= contexts && c < contexts + EMU_MAX_DEVICES && valid_device(c->device) &&
         retained[c->device] > 0;
}

CUresult cuCtxSetCurrent(CUcontext ctx) {
  ENTER("cuCtxSetCurrent");
  if (ctx && !valid_ctx(ctx)) return CUDA_ERROR_INVALID_CONTEXT;
  if (depth < 0) depth = 0;
  stack[depth] = (struct ctx *)ctx;
  return CUDA_SUCCESS;
}

CUresult cuCtxGetCurrent(CUcontext *pctx) {
  ENTER("cuCtxGetCurrent");
  *pctx = (CUcontext)current();
  return CUDA_SUCCESS;
}

CUresult cuCtxPushCurrent(CUcontext ctx) {
  ENTER("cuCtxPushCurrent");
  if (!valid_ctx(ctx)) return CUDA_ERROR_INVALID_CONTEXT;
  if (depth >= 15) return CUDA_ERROR_INVALID_VALUE;
  stack[++depth] = (struct ctx *)ctx;
  return CUDA_SUCCESS;
}

CUresult cuCtxPopCurrent(CUcontext *pctx) {
  ENTER("cuCtxPopCurrent");
  if (depth < 0 || !stack[depth]) return CUDA_ERROR_INVALID_CONTEXT;
  if (pctx) *pctx = (CUcontext)stack[depth];
  stack[depth--] = NULL;
  return CUDA_SUCCESS;
}

CUresult cuCtxGetDevice(CUdevice *device) {
  ENTER("cuCtxGetDevice");
  NEED_CONTEXT();
  *device = current()->device;
  return CUDA_SUCCESS;
}

CUresult cuCtxSynchronize(void) {
  ENTER("cuCtxSynchronize");
  NEED_CONTEXT();
  pthread_mutex_lock(&G);
  /* (drain() lets go of G: the list may change meanwhile, so start over) */
  for (int again = 1; again;) {
    again = 0;
    for (struct stream *s = streams; s; s = s->next)
      if (s->device == current()->device && !idle(s)) {
        drain(s);
        again = 1;
        break;
      }
  }
  pthread_mutex_unlock(&G);
  return sticky;
}

CUresult cuMemGetInfo(size_t *free_, size_t *total) {
  ENTER("cuMemGetInfo");
  NEED_CONTEXT();
  unsigned long long used = emu_used(current()->device, NULL, NULL, NULL);
  *total = emu_total();
  *free_ = used > *total ? 0 : *total - used;
  return CUDA_SUCCESS;
}

/* -- the VMM API ---------------------------------------------------------- */

static int valid_prop(const CUmemAllocationProp *prop) {
  return prop && prop->type == CU_MEM_ALLOCATION_TYPE_PINNED &&
         prop->location.type == CU_MEM_LOCATION_TYPE_DEVICE && valid_device(prop->location.id);
}

CUresult cuMemGetAllocationGranularity(size_t *granularity, const CUmemAllocationProp *prop,
                                       CUmemAllocationGranularity_flags option) {
  ENTER("cuMemGetAllocationGranularity");
  if (!valid_prop(prop) || !granularity) return CUDA_ERROR_INVALID_VALUE;
  if (option != CU_MEM_ALLOC_GRANULARITY_MINIMUM && option != CU_MEM_ALLOC_GRANULARITY_RECOMMENDED)
    return CUDA_ERROR_INVALID_VALUE;
  *granularity = GRANULARITY;
  return CUDA_SUCCESS;
}

CUresult cuMemCreate(CUmemGenericAllocationHandle *handle, size_t size,
                     const CUmemAllocationProp *prop, unsigned long long flags) {
  ENTER("cuMemCreate");
  if (!valid_prop(prop) || flags != 0 || size == 0 || size % GRANULARITY) {
    trace("cuMemCreate: invalid (size %zu)", size);
    return CUDA_ERROR_INVALID_VALUE;
  }
  int device = prop->location.id;
  pthread_mutex_lock(&G);
  unsigned long long used = emu_used(device, NULL, NULL, NULL);
  if (used + size > emu_total()) {
    pthread_mutex_unlock(&G);
    return CUDA_ERROR_OUT_OF_MEMORY;
  }
  char name[128];
  snprintf(name, sizeof name, "cudaemu:%s:%d:%zu", emu_node(), device, size);
  int fd = memfd_create(name, MFD_CLOEXEC);
  if (fd < 0 || ftruncate(fd, (off_t)size) != 0) {
    if (fd >= 0) close(fd);
    pthread_mutex_unlock(&G);
    return CUDA_ERROR_OUT_OF_MEMORY;
  }
  struct alloc *a = calloc(1, sizeof *a);
  a->fd = fd;
  a->size = size;
  a->device = device;
  a->exportable = (prop->requestedHandleTypes & CU_MEM_HANDLE_TYPE_POSIX_FILE_DESCRIPTOR) != 0;
  a->next = allocs;
  allocs = a;
  pthread_mutex_unlock(&G);
  *handle = (CUmemGenericAllocationHandle)(uintptr_t)a;
  return CUDA_SUCCESS;
}

CUresult cuMemRelease(CUmemGenericAllocationHandle handle) {
  ENTER("cuMemRelease");
  struct alloc *a = (struct alloc *)(uintptr_t)handle;
  pthread_mutex_lock(&G);
  if (!is_alloc(a) || a->fd < 0) {
    pthread_mutex_unlock(&G);
    return CUDA_ERROR_INVALID_VALUE;
  }
  close(a->fd); /* the pages live on while mapped (here or elsewhere) */
  a->fd = -1;
  if (a->maps == 0) drop_alloc(a);
  pthread_mutex_unlock(&G);
  return CUDA_SUCCESS;
}

CUresult cuMemExportToShareableHandle(void *shareableHandle, CUmemGenericAllocationHandle handle,
                                      CUmemAllocationHandleType handleType,
                                      unsigned long long flags) {
  ENTER("cuMemExportToShareableHandle");
  struct alloc *a = (struct alloc *)(uintptr_t)handle;
  pthread_mutex_lock(&G);
  CUresult r = CUDA_SUCCESS;
  if (!is_alloc(a) || a->fd < 0 || flags != 0 || !shareableHandle ||
      handleType != CU_MEM_HANDLE_TYPE_POSIX_FILE_DESCRIPTOR)
    r = CUDA_ERROR_INVALID_VALUE;
  else if (!a->exportable)
    r = CUDA_ERROR_NOT_PERMITTED;
  else {
    int fd = fcntl(a->fd, F_DUPFD, 0); /* a new fd, not close-on-exec */
    if (fd < 0)
      r = CUDA_ERROR_OUT_OF_MEMORY;
    else
      *(int *)shareableHandle = fd;
  }
  pthread_mutex_unlock(&G);
  return r;
}

CUresult cuMemImportFromShareableHandle(CUmemGenericAllocationHandle *handle, void *osHandle,
                                        CUmemAllocationHandleType shHandleType) {
  ENTER("cuMemImportFromShareableHandle");
  if (shHandleType != CU_MEM_HANDLE_TYPE_POSIX_FILE_DESCRIPTOR || !handle)
    return CUDA_ERROR_INVALID_VALUE;
  int fd = (int)(intptr_t)osHandle; /* the fd itself, cast to a pointer */
  char path[64], link[256];
  snprintf(path, sizeof path, "/proc/self/fd/%d", fd);
  ssize_t n = readlink(path, link, sizeof link - 1);
  if (n <= 0) {
    trace("cuMemImportFromShareableHandle: fd %d is not open", fd);
    return CUDA_ERROR_INVALID_VALUE;
  }
  link[n] = 0;
  int device;
  unsigned long long size;
  if (!emu_parse(link, &device, &size) || !valid_device(device)) {
    trace("cuMemImportFromShareableHandle: fd %d is %s, not an allocation", fd, link);
    return CUDA_ERROR_INVALID_VALUE;
  }
  int mine = fcntl(fd, F_DUPFD_CLOEXEC, 0);
  if (mine < 0) return CUDA_ERROR_OUT_OF_MEMORY;
  struct alloc *a = calloc(1, sizeof *a);
  a->fd = mine;
  a->size = size;
  a->device = device;
  a->exportable = 1;
  pthread_mutex_lock(&G);
  a->next = allocs;
  allocs = a;
  pthread_mutex_unlock(&G);
  *handle = (CUmemGenericAllocationHandle)(uintptr_t)a;
  return CUDA_SUCCESS;
}

CUresult cuMemAddressReserve(CUdeviceptr *ptr, size_t size, size_t alignment, CUdeviceptr addr,
                             unsigned long long flags) {
  ENTER("cuMemAddressReserve");
  if (!ptr || size == 0 || size % GRANULARITY || flags != 0 || addr % GRANULARITY ||
      (alignment & (alignment - 1)))
    return CUDA_ERROR_INVALID_VALUE;
  size_t align = alignment > GRANULARITY ? alignment : GRANULARITY;
  char *raw = mmap(NULL, size + align, PROT_NONE, MAP_PRIVATE | MAP_ANONYMOUS | MAP_NORESERVE, -1,
                   0);
  if (raw == MAP_FAILED) return CUDA_ERROR_OUT_OF_MEMORY;
  uintptr_t base = ((uintptr_t)raw + align - 1) / align * align;
  if (base > (uintptr_t)raw) munmap(raw, base - (uintptr_t)raw);
  size_t tail = (uintptr_t)raw + size + align - (base + size);
  if (tail) munmap((void *)(base + size), tail);
  struct reservation *r = calloc(1, sizeof *r);
  r->base = base;
  r->size = size;
  pthread_mutex_lock(&G);
  r->next = reservations;
  reservations = r;
  pthread_mutex_unlock(&G);
  *ptr = base;
  return CUDA_SUCCESS;
}

CUresult cuMemAddressFree(CUdeviceptr ptr, size_t size) {
  ENTER("cuMemAddressFree");
  pthread_mutex_lock(&G);
  struct reservation **at = &reservations;
  while (*at && !((*at)->base == ptr && (*at)->size == size)) at = &(*at)->next;
  CUresult r = CUDA_SUCCESS;
  if (!*at) {
    trace("cuMemAddressFree: 0x%llx (+%zu) was not reserved so", (unsigned long long)ptr, size);
    r = CUDA_ERROR_INVALID_VALUE;
  } else {
    for (struct mapping *m = mappings; m; m = m->next)
      if (m->base < ptr + size && ptr < m->base + m->size) {
        trace("cuMemAddressFree: 0x%llx still has mappings", (unsigned long long)ptr);
        r = CUDA_ERROR_INVALID_VALUE;
      }
    if (r == CUDA_SUCCESS) {
      struct reservation *gone = *at;
      *at = gone->next;
      munmap((void *)gone->base, gone->size);
      free(gone);
    }
  }
  pthread_mutex_unlock(&G);
  return r;
}

CUresult cuMemMap(CUdeviceptr ptr, size_t size, size_t offset, CUmemGenericAllocationHandle handle,
                  unsigned long long flags) {
  ENTER("cuMemMap");
  struct alloc *a = (struct alloc *)(uintptr_t)handle;
  pthread_mutex_lock(&G);
  CUresult r = CUDA_SUCCESS;
  if (!is_alloc(a) || a->fd < 0 || flags != 0 || ptr % GRANULARITY || size == 0) {
    r = CUDA_ERROR_INVALID_VALUE;
  } else if (offset != 0 || size != a->size) {
    /* The documentation: "offset ... currently must be zero"; whole
     * allocations are mapped (as PyTorch, NCCL and mscclpp do). */
    trace("cuMemMap: offset %zu, size %zu of an allocation of %zu", offset, size, a->size);
    r = CUDA_ERROR_INVALID_VALUE;
  } else if (!reservation_of(ptr, size)) {
    trace("cuMemMap: 0x%llx (+%zu) is not inside a reservation", (unsigned long long)ptr, size);
    r = CUDA_ERROR_INVALID_VALUE;
  } else {
    for (struct mapping *m = mappings; m; m = m->next)
      if (m->base < ptr + size && ptr < m->base + m->size) r = CUDA_ERROR_INVALID_VALUE;
  }
  if (r == CUDA_SUCCESS) {
    void *at = mmap((void *)ptr, size, PROT_NONE, MAP_SHARED | MAP_FIXED, a->fd, 0);
    void *shadow = mmap(NULL, size, PROT_READ | PROT_WRITE, MAP_SHARED, a->fd, 0);
    if (at == MAP_FAILED || shadow == MAP_FAILED) {
      if (shadow != MAP_FAILED) munmap(shadow, size);
      if (at != MAP_FAILED)
        mmap((void *)ptr, size, PROT_NONE, MAP_PRIVATE | MAP_ANONYMOUS | MAP_FIXED | MAP_NORESERVE,
             -1, 0);
      r = CUDA_ERROR_OUT_OF_MEMORY;
    } else {
      struct mapping *m = calloc(1, sizeof *m);
      m->base = ptr;
      m->size = size;
      m->shadow = shadow;
      m->alloc = a;
      m->next = mappings;
      mappings = m;
      a->maps++;
    }
  }
  pthread_mutex_unlock(&G);
  return r;
}

CUresult cuMemSetAccess(CUdeviceptr ptr, size_t size, const CUmemAccessDesc *desc, size_t count) {
  ENTER("cuMemSetAccess");
  if (!desc || count == 0 || ptr % GRANULARITY || size % GRANULARITY || size == 0)
    return CUDA_ERROR_INVALID_VALUE;
  int prot[EMU_MAX_DEVICES], set[EMU_MAX_DEVICES] = {0}, widest = PROT_NONE;
  for (size_t i = 0; i < count; i++) {
    if (desc[i].location.type != CU_MEM_LOCATION_TYPE_DEVICE || !valid_device(desc[i].location.id))
      return CUDA_ERROR_INVALID_DEVICE;
    int p = desc[i].flags == CU_MEM_ACCESS_FLAGS_PROT_READWRITE ? PROT_READ | PROT_WRITE
            : desc[i].flags == CU_MEM_ACCESS_FLAGS_PROT_READ     ? PROT_READ
            : desc[i].flags == CU_MEM_ACCESS_FLAGS_PROT_NONE     ? PROT_NONE
                                                                 : -2;
    if (p == -2) return CUDA_ERROR_INVALID_VALUE;
    prot[desc[i].location.id] = p;
    set[desc[i].location.id] = 1;
    if (p > widest) widest = p; /* (the CPU, where it may, sees the widest) */
  }
  pthread_mutex_lock(&G);
  /* The range must be fully mapped (by one or more whole mappings), and a
   * device other than the memory's own needs peer access to it. */
  size_t covered = 0;
  CUresult r = CUDA_SUCCESS;
  const char *peer = getenv("CUDAEMU_PEER");
  for (struct mapping *m = mappings; m; m = m->next)
    if (m->base >= ptr && m->base + m->size <= ptr + size) {
      covered += m->size;
      for (int d = 0; d < EMU_MAX_DEVICES; d++)
        if (set[d] && prot[d] != PROT_NONE && d != m->alloc->device && !(peer && atoi(peer))) {
          trace("cuMemSetAccess: device %d has no peer access to device %d", d, m->alloc->device);
          r = CUDA_ERROR_INVALID_DEVICE;
        }
    }
  if (r != CUDA_SUCCESS) {
  } else if (covered != size) {
    trace("cuMemSetAccess: 0x%llx (+%zu) is not fully mapped", (unsigned long long)ptr, size);
    r = CUDA_ERROR_INVALID_VALUE;
  } else if (host_access() && mprotect((void *)ptr, size, widest) != 0) {
    r = CUDA_ERROR_INVALID_VALUE;
  } else {
    for (struct mapping *m = mappings; m; m = m->next)
      if (m->base >= ptr && m->base + m->size <= ptr + size)
        for (int d = 0; d < EMU_MAX_DEVICES; d++)
          if (set[d]) m->access[d] = prot[d];
  }
  pthread_mutex_unlock(&G);
  return r;
}

CUresult cuMemUnmap(CUdeviceptr ptr, size_t size) {
  ENTER("cuMemUnmap");
  pthread_mutex_lock(&G);
  size_t covered = 0;
  int partial = 0;
  for (struct mapping *m = mappings; m; m = m->next) {
    int inside = m->base >= ptr && m->base + m->size <= ptr + size;
    int overlaps = m->base < ptr + size && ptr < m->base + m->size;
    if (inside) covered += m->size;
    else if (overlaps) partial = 1;
  }
  if (partial || covered != size || size == 0) {
    trace("cuMemUnmap: 0x%llx (+%zu) is not whole mappings", (unsigned long long)ptr, size);
    pthread_mutex_unlock(&G);
    return CUDA_ERROR_INVALID_VALUE;
  }
  if (queued_on(ptr, size)) {
    fault("cuMemUnmap of 0x%llx (+%zu) with copies into or out of it still queued",
          (unsigned long long)ptr, size);
    pthread_mutex_unlock(&G);
    return sticky;
  }
  struct mapping **at = &mappings;
  while (*at) {
    struct mapping *m = *at;
    if (m->base >= ptr && m->base + m->size <= ptr + size) {
      *at = m->next;
      mmap((void *)m->base, m->size, PROT_NONE, MAP_PRIVATE | MAP_ANONYMOUS | MAP_FIXED |
           MAP_NORESERVE, -1, 0); /* the reservation stays */
      munmap(m->shadow, m->size);
      struct alloc *a = m->alloc;
      if (--a->maps == 0 && a->fd < 0) drop_alloc(a);
      free(m);
    } else {
      at = &m->next;
    }
  }
  pthread_mutex_unlock(&G);
  return CUDA_SUCCESS;
}

/* -- pinned host memory --------------------------------------------------- */

static struct hostmem *hostmem_of(uintptr_t p, size_t n) {
  for (struct hostmem *h = hostmems; h; h = h->next)
    if (h->base <= p && p + n <= h->base + h->size) return h;
  return NULL;
}

CUresult cuMemHostAlloc(void **pp, size_t bytesize, unsigned int Flags) {
  ENTER("cuMemHostAlloc");
  NEED_CONTEXT();
  if (!pp || bytesize == 0 || (Flags & ~0x7u)) return CUDA_ERROR_INVALID_VALUE;
  void *p = mmap(NULL, bytesize, PROT_READ | PROT_WRITE, MAP_PRIVATE | MAP_ANONYMOUS, -1, 0);
  if (p == MAP_FAILED) return CUDA_ERROR_OUT_OF_MEMORY;
  struct hostmem *h = calloc(1, sizeof *h);
  h->base = (uintptr_t)p;
  h->size = bytesize;
  h->allocated = 1;
  h->devicemap = (Flags & CU_MEMHOSTALLOC_DEVICEMAP) != 0;
  pthread_mutex_lock(&G);
  h->next = hostmems;
  hostmems = h;
  pthread_mutex_unlock(&G);
  *pp = p;
  return CUDA_SUCCESS;
}

CUresult cuMemFreeHost(void *p) {
  ENTER("cuMemFreeHost");
  NEED_CONTEXT();
  pthread_mutex_lock(&G);
  struct hostmem **at = &hostmems;
  while (*at && !((*at)->base == (uintptr_t)p && (*at)->allocated)) at = &(*at)->next;
  CUresult r = CUDA_ERROR_INVALID_VALUE;
  if (*at) {
    struct hostmem *h = *at;
    if (queued_on(h->base, h->size)) {
      fault("cuMemFreeHost of %p with copies still queued on it", p);
      r = sticky;
    } else {
      *at = h->next;
      munmap(p, h->size);
      free(h);
      r = CUDA_SUCCESS;
    }
  }
  pthread_mutex_unlock(&G);
  return r;
}

CUresult cuMemHostRegister(void *p, size_t bytesize, unsigned int Flags) {
  ENTER("cuMemHostRegister");
  NEED_CONTEXT();
  if (!p || bytesize == 0 || (Flags & ~0xfu)) return CUDA_ERROR_INVALID_VALUE;
  uintptr_t at = (uintptr_t)p;
  pthread_mutex_lock(&G);
  for (struct hostmem *h = hostmems; h; h = h->next)
    if (h->base < at + bytesize && at < h->base + h->size) {
      pthread_mutex_unlock(&G);
      return CUDA_ERROR_HOST_MEMORY_ALREADY_REGISTERED;
    }
  struct hostmem *h = calloc(1, sizeof *h);
  h->base = at;
  h->size = bytesize;
  h->devicemap = (Flags & CU_MEMHOSTREGISTER_DEVICEMAP) != 0;
  h->next = hostmems;
  hostmems = h;
  pthread_mutex_unlock(&G);
  return CUDA_SUCCESS;
}

CUresult cuMemHostUnregister(void *p) {
  ENTER("cuMemHostUnregister");
  NEED_CONTEXT();
  pthread_mutex_lock(&G);
  struct hostmem **at = &hostmems;
  while (*at && !((*at)->base == (uintptr_t)p && !(*at)->allocated)) at = &(*at)->next;
  CUresult r = CUDA_ERROR_HOST_MEMORY_NOT_REGISTERED;
  if (*at) {
    struct hostmem *h = *at;
    if (queued_on(h->base, h->size)) {
      fault("cuMemHostUnregister of %p with copies still queued on it", p);
      r = sticky;
    } else {
      *at = h->next;
      free(h);
      r = CUDA_SUCCESS;
    }
  }
  pthread_mutex_unlock(&G);
  return r;
}

CUresult cuMemHostGetDevicePointer(CUdeviceptr *pdptr, void *p, unsigned int Flags) {
  ENTER("cuMemHostGetDevicePointer");
  NEED_CONTEXT();
  if (Flags != 0 || !pdptr) return CUDA_ERROR_INVALID_VALUE;
  pthread_mutex_lock(&G);
  struct hostmem *h = hostmem_of((uintptr_t)p, 1);
  int mapped = h && h->devicemap;
  pthread_mutex_unlock(&G);
  /* "fails if the CU_MEMHOSTALLOC_DEVICEMAP flag was not specified" */
  if (!mapped) return CUDA_ERROR_INVALID_VALUE;
  *pdptr = (CUdeviceptr)(uintptr_t)p; /* unified addressing */
  return CUDA_SUCCESS;
}

/* -- streams and events --------------------------------------------------- */

CUresult cuStreamCreate(CUstream *phStream, unsigned int Flags) {
  ENTER("cuStreamCreate");
  NEED_CONTEXT();
  if (!phStream || (Flags & ~CU_STREAM_NON_BLOCKING)) return CUDA_ERROR_INVALID_VALUE;
  struct stream *s = calloc(1, sizeof *s);
  s->device = current()->device;
  pthread_mutex_init(&s->lock, NULL);
  pthread_cond_init(&s->cond, NULL);
  if (pthread_create(&s->thread, NULL, stream_main, s) != 0) {
    free(s);
    return CUDA_ERROR_OUT_OF_MEMORY;
  }
  pthread_mutex_lock(&G);
  s->next = streams;
  streams = s;
  pthread_mutex_unlock(&G);
  *phStream = (CUstream)s;
  return CUDA_SUCCESS;
}

CUresult cuStreamSynchronize(CUstream hStream) {
  ENTER("cuStreamSynchronize");
  struct stream *s = (struct stream *)hStream;
  pthread_mutex_lock(&G);
  if (!is_stream(s)) {
    pthread_mutex_unlock(&G);
    trace("cuStreamSynchronize: not a stream (the legacy stream is not emulated)");
    return CUDA_ERROR_INVALID_HANDLE;
  }
  drain(s);
  pthread_mutex_unlock(&G);
  return sticky;
}

CUresult cuStreamDestroy(CUstream hStream) {
  ENTER("cuStreamDestroy");
  struct stream *s = (struct stream *)hStream;
  pthread_mutex_lock(&G);
  struct stream **at = &streams;
  while (*at && *at != s) at = &(*at)->next;
  if (!*at) {
    pthread_mutex_unlock(&G);
    return CUDA_ERROR_INVALID_HANDLE;
  }
  drain(s); /* (the driver lets queued work finish) */
  *at = s->next;
  pthread_mutex_unlock(&G);
  pthread_mutex_lock(&s->lock);
  s->stop = 1;
  pthread_cond_signal(&s->cond);
  pthread_mutex_unlock(&s->lock);
  pthread_join(s->thread, NULL);
  free(s);
  return CUDA_SUCCESS;
}

CUresult cuEventCreate(CUevent *phEvent, unsigned int Flags) {
  ENTER("cuEventCreate");
  NEED_CONTEXT();
  if (!phEvent || (Flags & ~0xfu)) return CUDA_ERROR_INVALID_VALUE;
  struct event *e = calloc(1, sizeof *e);
  e->device = current()->device;
  pthread_mutex_lock(&G);
  e->next = events;
  events = e;
  pthread_mutex_unlock(&G);
  *phEvent = (CUevent)e;
  return CUDA_SUCCESS;
}

CUresult cuEventRecord(CUevent hEvent, CUstream hStream) {
  ENTER("cuEventRecord");
  struct event *e = (struct event *)hEvent;
  struct stream *s = (struct stream *)hStream;
  pthread_mutex_lock(&G);
  if (!is_event(e) || !is_stream(s)) {
    pthread_mutex_unlock(&G);
    return CUDA_ERROR_INVALID_HANDLE;
  }
  if (e->device != s->device) {
    pthread_mutex_unlock(&G);
    return CUDA_ERROR_INVALID_HANDLE;
  }
  struct op *op = calloc(1, sizeof *op);
  op->kind = OP_EVENT;
  op->event = e;
  op->generation = ++e->recorded;
  pthread_mutex_unlock(&G);
  enqueue(s, op);
  return CUDA_SUCCESS;
}

CUresult cuEventQuery(CUevent hEvent) {
  ENTER("cuEventQuery");
  struct event *e = (struct event *)hEvent;
  pthread_mutex_lock(&G);
  CUresult r = !is_event(e) ? CUDA_ERROR_INVALID_HANDLE
               : e->reached < e->recorded ? CUDA_ERROR_NOT_READY
                                          : CUDA_SUCCESS;
  pthread_mutex_unlock(&G);
  return r;
}

CUresult cuEventSynchronize(CUevent hEvent) {
  ENTER("cuEventSynchronize");
  struct event *e = (struct event *)hEvent;
  pthread_mutex_lock(&G);
  if (!is_event(e)) {
    pthread_mutex_unlock(&G);
    return CUDA_ERROR_INVALID_HANDLE;
  }
  unsigned long long target = e->recorded;
  while (e->reached < target) pthread_cond_wait(&progress, &G);
  pthread_mutex_unlock(&G);
  return sticky;
}

CUresult cuEventDestroy(CUevent hEvent) {
  ENTER("cuEventDestroy");
  struct event *e = (struct event *)hEvent;
  pthread_mutex_lock(&G);
  struct event **at = &events;
  while (*at && *at != e) at = &(*at)->next;
  CUresult r = CUDA_ERROR_INVALID_HANDLE;
  if (*at) {
    /* Unlinked, not freed: a queued record may still reach it (a few bytes
     * per event, for the life of the process). */
    *at = e->next;
    r = CUDA_SUCCESS;
  }
  pthread_mutex_unlock(&G);
  return r;
}

/* -- copies --------------------------------------------------------------- */

static int in_reservation(uintptr_t p) {
  return reservation_of(p, 1) != NULL;
}

static CUresult copy_async(uintptr_t dst, uintptr_t src, size_t n, CUstream hStream, int dst_dev,
                           int src_dev, const char *name) {
  NEED_CONTEXT();
  struct stream *s = (struct stream *)hStream;
  pthread_mutex_lock(&G);
  if (!is_stream(s)) {
    pthread_mutex_unlock(&G);
    trace("%s: not a stream", name);
    return CUDA_ERROR_INVALID_HANDLE;
  }
  /* What can be checked when queued is (as on a GPU): device pointers that
   * point nowhere. Mapped-ness is checked when the copy runs. */
  if ((dst_dev && !in_reservation(dst)) || (src_dev && !in_reservation(src))) {
    pthread_mutex_unlock(&G);
    trace("%s: a device pointer that is no device memory", name);
    return CUDA_ERROR_INVALID_VALUE;
  }
  pthread_mutex_unlock(&G);
  if (n == 0) return CUDA_SUCCESS;
  struct op *op = calloc(1, sizeof *op);
  op->kind = OP_COPY;
  op->dst = dst;
  op->src = src;
  op->size = n;
  op->dst_device = dst_dev;
  op->src_device = src_dev;
  enqueue(s, op);
  return CUDA_SUCCESS;
}

CUresult cuMemcpyHtoDAsync(CUdeviceptr dstDevice, const void *srcHost, size_t ByteCount,
                           CUstream hStream) {
  ENTER("cuMemcpyHtoDAsync");
  return copy_async(dstDevice, (uintptr_t)srcHost, ByteCount, hStream, 1, 0, "cuMemcpyHtoDAsync");
}

CUresult cuMemcpyDtoHAsync(void *dstHost, CUdeviceptr srcDevice, size_t ByteCount,
                           CUstream hStream) {
  ENTER("cuMemcpyDtoHAsync");
  return copy_async((uintptr_t)dstHost, srcDevice, ByteCount, hStream, 0, 1, "cuMemcpyDtoHAsync");
}

CUresult cuMemcpyDtoDAsync(CUdeviceptr dstDevice, CUdeviceptr srcDevice, size_t ByteCount,
                           CUstream hStream) {
  ENTER("cuMemcpyDtoDAsync");
  return copy_async(dstDevice, srcDevice, ByteCount, hStream, 1, 1, "cuMemcpyDtoDAsync");
}

CUresult cuMemcpyBatchAsync(CUdeviceptr *dsts, CUdeviceptr *srcs, size_t *sizes, size_t count,
                            CUmemcpyAttributes *attrs, size_t *attrsIdxs, size_t numAttrs,
                            CUstream hStream) {
  ENTER("cuMemcpyBatchAsync");
  if (!dsts || !srcs || !sizes || count == 0 || !attrs || !attrsIdxs || numAttrs == 0 ||
      numAttrs > count || attrsIdxs[0] != 0)
    return CUDA_ERROR_INVALID_VALUE;
  for (size_t i = 0; i < numAttrs; i++) {
    if (attrsIdxs[i] >= count || (i && attrsIdxs[i] <= attrsIdxs[i - 1]))
      return CUDA_ERROR_INVALID_VALUE;
    if (attrs[i].srcAccessOrder == CU_MEMCPY_SRC_ACCESS_ORDER_INVALID)
      return CUDA_ERROR_INVALID_VALUE;
  }
  for (size_t i = 0; i < count; i++) {
    pthread_mutex_lock(&G);
    int dd = in_reservation(dsts[i]), sd = in_reservation(srcs[i]);
    pthread_mutex_unlock(&G);
    CUresult r = copy_async(dsts[i], srcs[i], sizes[i], hStream, dd, sd, "cuMemcpyBatchAsync");
    if (r != CUDA_SUCCESS) return r;
  }
  return CUDA_SUCCESS;
}

/* The synchronous copies: queued on a stream of their own and waited for
 * (the legacy default stream is not emulated; a GPU's synchronous copy also
 * returns once the bytes are there). */
static CUresult copy_sync(uintptr_t dst, uintptr_t src, size_t n, int dst_dev, int src_dev,
                          const char *name) {
  NEED_CONTEXT();
  CUstream s;
  CUresult r = cuStreamCreate(&s, CU_STREAM_NON_BLOCKING);
  if (r != CUDA_SUCCESS) return r;
  r = copy_async(dst, src, n, s, dst_dev, src_dev, name);
  CUresult w = cuStreamSynchronize(s);
  cuStreamDestroy(s);
  return r != CUDA_SUCCESS ? r : w;
}

CUresult cuMemcpyHtoD(CUdeviceptr dstDevice, const void *srcHost, size_t ByteCount) {
  ENTER("cuMemcpyHtoD");
  return copy_sync(dstDevice, (uintptr_t)srcHost, ByteCount, 1, 0, "cuMemcpyHtoD");
}

CUresult cuMemcpyDtoH(void *dstHost, CUdeviceptr srcDevice, size_t ByteCount) {
  ENTER("cuMemcpyDtoH");
  return copy_sync((uintptr_t)dstHost, srcDevice, ByteCount, 0, 1, "cuMemcpyDtoH");
}

CUresult cuMemcpyDtoD(CUdeviceptr dstDevice, CUdeviceptr srcDevice, size_t ByteCount) {
  ENTER("cuMemcpyDtoD");
  return copy_sync(dstDevice, srcDevice, ByteCount, 1, 1, "cuMemcpyDtoD");
}

/* -- the driver's entry point --------------------------------------------- */


static const struct {
  const char *name;
  void *fn;
} entries[] = {
    /* (cuda.h renames the versioned ones, cuMemGetInfo to cuMemGetInfo_v2 and
     * so on; the driver is asked for them by their plain names.) */
    {"cuGetErrorName", (void *)cuGetErrorName},
    {"cuGetErrorString", (void *)cuGetErrorString},
    {"cuInit", (void *)cuInit},
    {"cuDriverGetVersion", (void *)cuDriverGetVersion},
    {"cuDeviceGetCount", (void *)cuDeviceGetCount},
    {"cuDeviceGet", (void *)cuDeviceGet},
    {"cuDeviceGetName", (void *)cuDeviceGetName},
    {"cuDeviceGetUuid", (void *)cuDeviceGetUuid},
    {"cuDeviceTotalMem", (void *)cuDeviceTotalMem},
    {"cuDeviceGetAttribute", (void *)cuDeviceGetAttribute},
    {"cuDeviceCanAccessPeer", (void *)cuDeviceCanAccessPeer},
    {"cuDevicePrimaryCtxRetain", (void *)cuDevicePrimaryCtxRetain},
    {"cuDevicePrimaryCtxRelease", (void *)cuDevicePrimaryCtxRelease},
    {"cuCtxSetCurrent", (void *)cuCtxSetCurrent},
    {"cuCtxGetCurrent", (void *)cuCtxGetCurrent},
    {"cuCtxPushCurrent", (void *)cuCtxPushCurrent},
    {"cuCtxPopCurrent", (void *)cuCtxPopCurrent},
    {"cuCtxGetDevice", (void *)cuCtxGetDevice},
    {"cuCtxSynchronize", (void *)cuCtxSynchronize},
    {"cuMemGetInfo", (void *)cuMemGetInfo},
    {"cuMemGetAllocationGranularity", (void *)cuMemGetAllocationGranularity},
    {"cuMemCreate", (void *)cuMemCreate},
    {"cuMemRelease", (void *)cuMemRelease},
    {"cuMemExportToShareableHandle", (void *)cuMemExportToShareableHandle},
    {"cuMemImportFromShareableHandle", (void *)cuMemImportFromShareableHandle},
    {"cuMemAddressReserve", (void *)cuMemAddressReserve},
    {"cuMemAddressFree", (void *)cuMemAddressFree},
    {"cuMemMap", (void *)cuMemMap},
    {"cuMemSetAccess", (void *)cuMemSetAccess},
    {"cuMemUnmap", (void *)cuMemUnmap},
    {"cuMemHostAlloc", (void *)cuMemHostAlloc},
    {"cuMemFreeHost", (void *)cuMemFreeHost},
    {"cuMemHostRegister", (void *)cuMemHostRegister},
    {"cuMemHostUnregister", (void *)cuMemHostUnregister},
    {"cuMemHostGetDevicePointer", (void *)cuMemHostGetDevicePointer},
    {"cuStreamCreate", (void *)cuStreamCreate},
    {"cuStreamSynchronize", (void *)cuStreamSynchronize},
    {"cuStreamDestroy", (void *)cuStreamDestroy},
    {"cuEventCreate", (void *)cuEventCreate},
    {"cuEventRecord", (void *)cuEventRecord},
    {"cuEventQuery", (void *)cuEventQuery},
    {"cuEventSynchronize", (void *)cuEventSynchronize},
    {"cuEventDestroy", (void *)cuEventDestroy},
    {"cuMemcpyHtoD", (void *)cuMemcpyHtoD},
    {"cuMemcpyDtoH", (void *)cuMemcpyDtoH},
    {"cuMemcpyDtoD", (void *)cuMemcpyDtoD},
    {"cuMemcpyHtoDAsync", (void *)cuMemcpyHtoDAsync},
    {"cuMemcpyDtoHAsync", (void *)cuMemcpyDtoHAsync},
    {"cuMemcpyDtoDAsync", (void *)cuMemcpyDtoDAsync},
    {"cuMemcpyBatchAsync", (void *)cuMemcpyBatchAsync},
};

CUresult cuGetProcAddress(const char *symbol, void **pfn, int cudaVersion, cuuint64_t flags,
                          CUdriverProcAddressQueryResult *symbolStatus) {
  (void)flags;
  if (!symbol || !pfn) return CUDA_ERROR_INVALID_VALUE;
  /* Only CUDA 13's cuMemcpyBatchAsync (no failIdx) is emulated: a caller
   * asking for the 12.8 one (cuda-bindings 12) is told there is none. */
  if (strcmp(symbol, "cuMemcpyBatchAsync") == 0 && cudaVersion < 13000) {
    *pfn = NULL;
    if (symbolStatus) *symbolStatus = CU_GET_PROC_ADDRESS_VERSION_NOT_SUFFICIENT;
    return CUDA_ERROR_NOT_FOUND;
  }
  for (size_t i = 0; i < sizeof entries / sizeof *entries; i++)
    if (strcmp(entries[i].name, symbol) == 0) {
      *pfn = entries[i].fn;
      if (symbolStatus) *symbolStatus = CU_GET_PROC_ADDRESS_SUCCESS;
      return CUDA_SUCCESS;
    }
  *pfn = NULL;
  if (symbolStatus) *symbolStatus = CU_GET_PROC_ADDRESS_SYMBOL_NOT_FOUND;
  return CUDA_ERROR_NOT_FOUND;
}
