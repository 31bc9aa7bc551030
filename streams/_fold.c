/* streams._fold: `DeviceWindow.add_sample` (streams/allocation.py) in C, for the worker's hot path.
 *
 * fold(policy, sm_weight, settings, window, event_id, time_ms, sample, price, cost_fusd) -> bool
 *
 * The same arithmetic as `owner_parts` + `DeviceWindow._fold`, operation for operation, so the
 * rows are bit-identical (a hypothesis test holds the two together):
 *   - an int mixed with a float is converted with PyLong_AsDouble, as Python's float ops do;
 *   - an int divided by an int is a float division only where both are exact doubles (|x| <=
 *     2**53, which every valid sample satisfies: fields.MAX_BYTES is 2**50), as CPython does;
 *   - round() is CPython's float.__round__: round half to even;
 *   - sums of floats run left to right; the module is built with -ffp-contract=off (no FMA).
 * Anything outside that domain (other types, a non-int event time, a negative cost, more than
 * MAX_PROCESSES processes, an intermediate beyond int64, a window whose containers have other
 * shapes) is handed to the Python method `window.add_sample`, which is the reference. Nothing
 * in the window changes before every part is computed and checked, so a fallback starts clean.
 */
#define PY_SSIZE_T_CLEAN
#include <Python.h>
#include <math.h>
#include <stdint.h>

#define MAX_PROCESSES 64
#define INT64_LIMIT 9223372036854775808.0   /* 2**63 */

enum { DOMINANT = 0, MEMORY = 1, SM = 2, WEIGHTED = 3 };

static PyObject *HOST; /* streams.rows.HOST, set by init() */
static PyObject *s_sample_ids, *s_cost_fusd, *s_idle_fusd, *s_interval_ns, *s_sm_pct_us,
    *s_mem_byte_seconds, *s_owners, *s_first_key, *s_first_sample, *s_first_price,
    *s_interval_s, *s_processes, *s_mem_total_bytes, *s_mem_used_bytes, *s_sm_util_pct,
    *s_pod_uid, *s_add_sample;

typedef struct {
    PyObject *owner; /* borrowed from the sample */
    int64_t parts[4]; /* COST, DEVICE_NS, SM_PCT_US, MEM_BYTE_SECONDS */
} Part;

/* CPython's float.__round__(x) with no digits, as a double (half to even). */
static double py_round(double x) {
    double rounded = round(x);
    if (fabs(x - rounded) == 0.5) {
        rounded = 2.0 * round(x / 2.0);
    }
    return rounded;
}

/* A rounded double as int64; 0 when it does not fit (the caller falls back). */
static int to_int64(double rounded, int64_t *out) {
    if (!(rounded > -INT64_LIMIT && rounded < INT64_LIMIT)) {
        return 0;
    }
    *out = (int64_t)rounded;
    return 1;
}

/* `x or 0.0` for a float-or-None attribute; 0 when it is neither (fallback). */
static int float_or_zero(PyObject *value, double *out) {
    if (value == Py_None) {
        *out = 0.0;
        return 1;
    }
    if (!PyFloat_CheckExact(value)) {
        return 0;
    }
    double x = PyFloat_AS_DOUBLE(value);
    *out = x == 0.0 ? 0.0 : x; /* -0.0 is falsy too */
    return 1;
}

/* An exact int within +-2**53 as a double; 0 otherwise (fallback). */
static int exact_int(PyObject *value, double *out) {
    if (!PyLong_CheckExact(value)) {
        return 0;
    }
    int overflow = 0;
    long long v = PyLong_AsLongLongAndOverflow(value, &overflow);
    if (overflow || (v == -1 && PyErr_Occurred())) {
        PyErr_Clear();
        return 0;
    }
    if (v > 9007199254740992LL || v < -9007199254740992LL) {
        return 0;
    }
    *out = (double)v;
    return 1;
}

static int add_int64(PyObject *target, PyObject *name, int64_t amount) {
    PyObject *current = PyObject_GetAttr(target, name);
    if (current == NULL) {
        return -1;
    }
    PyObject *delta = PyLong_FromLongLong(amount);
    if (delta == NULL) {
        Py_DECREF(current);
        return -1;
    }
    PyObject *sum = PyNumber_Add(current, delta);
    Py_DECREF(current);
    Py_DECREF(delta);
    if (sum == NULL) {
        return -1;
    }
    int rc = PyObject_SetAttr(target, name, sum);
    Py_DECREF(sum);
    return rc;
}

/* Steps 3-6 into `parts` (first-seen owner order); returns the number of owners, -1 on a
 * Python error, -2 for "outside the fast domain". `idle` gets the idle femto-USD. The owner
 * names are kept alive in `held` (`*n_held` of them), which the caller releases: a process
 * object need not keep returning the same string. */
static Py_ssize_t owner_parts(PyObject *processes, double mem_total, int64_t cost_fusd,
                              double cost_d, double interval_ns_d, double dt, int policy,
                              double w, Part *parts, int64_t *idle, PyObject **held,
                              Py_ssize_t *n_held) {
    Py_ssize_t n = PyTuple_GET_SIZE(processes);
    double shares[MAX_PROCESSES];
    double pcts[MAX_PROCESSES];
    double mems[MAX_PROCESSES];
    PyObject *owners[MAX_PROCESSES];
    double total = 0.0;
    for (Py_ssize_t i = 0; i < n; i++) {
        PyObject *p = PyTuple_GET_ITEM(processes, i);
        PyObject *mem_o = PyObject_GetAttr(p, s_mem_used_bytes);
        if (mem_o == NULL) {
            return -1;
        }
        /* Attributes are read in the reference's order, so a broken process raises the same
         * error in either: memory and SM of every process first, pod uids after. */
        int ok = exact_int(mem_o, &mems[i]);
        Py_DECREF(mem_o);
        if (!ok) {
            return -2;
        }
        PyObject *pct_o = PyObject_GetAttr(p, s_sm_util_pct);
        if (pct_o == NULL) {
            return -1;
        }
        ok = float_or_zero(pct_o, &pcts[i]);
        Py_DECREF(pct_o);
        if (!ok) {
            return -2;
        }
        double m = mems[i] / mem_total;
        m = m < 0.0 ? 0.0 : m > 1.0 ? 1.0 : m;
        double u = pcts[i] / 100.0;
        u = u < 0.0 ? 0.0 : u > 1.0 ? 1.0 : u;
        double a;
        if (policy == DOMINANT) {
            a = m > u ? m : u;
        } else if (policy == MEMORY) {
            a = m;
        } else if (policy == SM) {
            a = u;
        } else {
            a = w * u + (1.0 - w) * m;
        }
        shares[i] = a;
        total += a;
    }
    if (total > 1.0) {
        for (Py_ssize_t i = 0; i < n; i++) {
            shares[i] = shares[i] / total;
        }
    }
    Py_ssize_t groups = 0;
    int64_t allocated = 0;
    for (Py_ssize_t i = 0; i < n; i++) {
        PyObject *uid = PyObject_GetAttr(PyTuple_GET_ITEM(processes, i), s_pod_uid);
        if (uid == NULL) {
            return -1;
        }
        /* `pod_uid or HOST` */
        if (uid == Py_None || (PyUnicode_CheckExact(uid) && PyUnicode_GET_LENGTH(uid) == 0)) {
            owners[i] = HOST;
            Py_DECREF(uid);
        } else if (PyUnicode_CheckExact(uid)) {
            owners[i] = held[(*n_held)++] = uid; /* the caller releases it */
        } else {
            Py_DECREF(uid);
            return -2;
        }
        int64_t cost, ns, sm, mem;
        if (!to_int64(py_round(cost_d * shares[i]), &cost) ||
            !to_int64(py_round(interval_ns_d * shares[i]), &ns) ||
            !to_int64(py_round(dt * pcts[i] * 1e6), &sm) ||
            !to_int64(py_round(mems[i] * dt), &mem)) {
            return -2;
        }
        if (__builtin_add_overflow(allocated, cost, &allocated)) {
            return -2;
        }
        Py_ssize_t g = 0;
        for (; g < groups; g++) {
            if (parts[g].owner == owners[i]) {
                break;
            }
            int eq = PyUnicode_Compare(parts[g].owner, owners[i]);
            if (eq == -1 && PyErr_Occurred()) {
                return -1;
            }
            if (eq == 0) {
                break;
            }
        }
        if (g == groups) {
            parts[g].owner = owners[i];
            parts[g].parts[0] = cost;
            parts[g].parts[1] = ns;
            parts[g].parts[2] = sm;
            parts[g].parts[3] = mem;
            groups++;
        } else if (__builtin_add_overflow(parts[g].parts[0], cost, &parts[g].parts[0]) ||
                   __builtin_add_overflow(parts[g].parts[1], ns, &parts[g].parts[1]) ||
                   __builtin_add_overflow(parts[g].parts[2], sm, &parts[g].parts[2]) ||
                   __builtin_add_overflow(parts[g].parts[3], mem, &parts[g].parts[3])) {
            return -2;
        }
    }
    if (allocated > cost_fusd && groups == 0) {
        return -2; /* a negative cost and no process: Python's max() of nothing raises */
    }
    if (allocated > cost_fusd) {
        /* Rounding of normalised shares can overshoot: take it from the largest (cost, owner). */
        Py_ssize_t largest = 0;
        for (Py_ssize_t g = 1; g < groups; g++) {
            if (parts[g].parts[0] > parts[largest].parts[0]) {
                largest = g;
            } else if (parts[g].parts[0] == parts[largest].parts[0]) {
                int gt = PyObject_RichCompareBool(parts[g].owner, parts[largest].owner, Py_GT);
                if (gt < 0) {
                    return -1;
                }
                if (gt) {
                    largest = g;
                }
            }
        }
        parts[largest].parts[0] -= allocated - cost_fusd;
        allocated = cost_fusd;
    }
    *idle = cost_fusd - allocated;
    return groups;
}

/* Fold computed parts into the window (`DeviceWindow._fold`). `owners` is the window's dict,
 * `totals[g]` the (checked) totals list of parts[g].owner or NULL, `first` its first_key. */
static int merge(PyObject *window, PyObject *sample_ids, PyObject *owners, PyObject **totals,
                 PyObject *first, PyObject *event_id, PyObject *time_ms, PyObject *sample,
                 PyObject *price, int64_t cost_fusd, int64_t idle, int64_t interval_ns,
                 int64_t sm_pct_us, int64_t mem_byte_seconds, Part *parts, Py_ssize_t groups) {
    if (PySet_Add(sample_ids, event_id) < 0 || add_int64(window, s_cost_fusd, cost_fusd) < 0 ||
        add_int64(window, s_idle_fusd, idle) < 0 ||
        add_int64(window, s_interval_ns, interval_ns) < 0 ||
        add_int64(window, s_sm_pct_us, sm_pct_us) < 0 ||
        add_int64(window, s_mem_byte_seconds, mem_byte_seconds) < 0) {
        return -1;
    }
    for (Py_ssize_t g = 0; g < groups; g++) {
        if (totals[g] == NULL) {
            PyObject *fresh = PyList_New(4);
            if (fresh == NULL) {
                return -1;
            }
            for (int k = 0; k < 4; k++) {
                PyObject *v = PyLong_FromLongLong(parts[g].parts[k]);
                if (v == NULL) {
                    Py_DECREF(fresh);
                    return -1;
                }
                PyList_SET_ITEM(fresh, k, v);
            }
            int rc = PyDict_SetItem(owners, parts[g].owner, fresh);
            Py_DECREF(fresh);
            if (rc < 0) {
                return -1;
            }
            continue;
        }
        for (int k = 0; k < 4; k++) {
            PyObject *delta = PyLong_FromLongLong(parts[g].parts[k]);
            if (delta == NULL) {
                return -1;
            }
            PyObject *sum = PyNumber_Add(PyList_GET_ITEM(totals[g], k), delta);
            Py_DECREF(delta);
            if (sum == NULL) {
                return -1;
            }
            PyList_SetItem(totals[g], k, sum); /* steals sum, releases the old total */
        }
    }
    /* The first sample by (event time, id) describes the device in the rows (see _fold). */
    int earlier = 1;
    if (first != Py_None) {
        earlier = PyObject_RichCompareBool(time_ms, PyTuple_GET_ITEM(first, 0), Py_LT);
        if (earlier == 0) {
            earlier = PyObject_RichCompareBool(time_ms, PyTuple_GET_ITEM(first, 0), Py_EQ);
            if (earlier > 0) {
                earlier = PyObject_RichCompareBool(event_id, PyTuple_GET_ITEM(first, 1), Py_LT);
            }
        }
    }
    if (earlier < 0) {
        return -1;
    }
    if (earlier) {
        PyObject *key = PyTuple_Pack(2, time_ms, event_id);
        if (key == NULL) {
            return -1;
        }
        int rc = PyObject_SetAttr(window, s_first_key, key);
        Py_DECREF(key);
        if (rc < 0 || PyObject_SetAttr(window, s_first_sample, sample) < 0 ||
            PyObject_SetAttr(window, s_first_price, price) < 0) {
            return -1;
        }
    }
    return 0;
}

static PyObject *fallback(PyObject *window, PyObject *const *args, PyObject *settings) {
    /* window.add_sample(event_id, time_ms, sample, price, cost_fusd, settings) */
    PyObject *call[7] = {window, args[4], args[5], args[6], args[7], args[8], settings};
    return PyObject_VectorcallMethod(s_add_sample, call, 7, NULL);
}

static PyObject *fold(PyObject *module, PyObject *const *args, Py_ssize_t nargs) {
    (void)module;
    if (nargs != 9) {
        PyErr_SetString(PyExc_TypeError, "fold() takes 9 arguments");
        return NULL;
    }
    if (HOST == NULL) {
        PyErr_SetString(PyExc_RuntimeError, "streams._fold.init() was not called");
        return NULL;
    }
    long policy = PyLong_AsLong(args[0]);
    double w = PyFloat_AsDouble(args[1]);
    if (PyErr_Occurred()) {
        return NULL;
    }
    PyObject *settings = args[2], *window = args[3], *event_id = args[4], *time_ms = args[5];
    PyObject *sample = args[6], *price = args[7], *cost_o = args[8];

    PyObject *sample_ids = PyObject_GetAttr(window, s_sample_ids);
    if (sample_ids == NULL) {
        return NULL;
    }
    int seen = PySequence_Contains(sample_ids, event_id);
    if (seen != 0) {
        Py_DECREF(sample_ids);
        if (seen < 0) {
            return NULL;
        }
        Py_RETURN_FALSE;
    }
    PyObject *result = NULL;
    PyObject *dt_o = NULL, *processes = NULL, *total_o = NULL, *used_o = NULL, *pct_o = NULL;
    PyObject *owners = NULL, *first = NULL;
    PyObject *held[MAX_PROCESSES];   /* owner names in use */
    PyObject *totals[MAX_PROCESSES]; /* each owner's totals list in the window, or NULL */
    Py_ssize_t n_held = 0, n_totals = 0;
    if (!PySet_CheckExact(sample_ids) || !PyLong_CheckExact(cost_o) ||
        !PyLong_CheckExact(time_ms)) {
        goto use_python;
    }
    int overflow = 0;
    long long cost_fusd = PyLong_AsLongLongAndOverflow(cost_o, &overflow);
    if (overflow || cost_fusd < 0) { /* (a sample's cost is never negative) */
        PyErr_Clear();
        goto use_python;
    }
    double cost_d = PyLong_AsDouble(cost_o);
    if ((dt_o = PyObject_GetAttr(sample, s_interval_s)) == NULL ||
        (processes = PyObject_GetAttr(sample, s_processes)) == NULL ||
        (total_o = PyObject_GetAttr(sample, s_mem_total_bytes)) == NULL ||
        (used_o = PyObject_GetAttr(sample, s_mem_used_bytes)) == NULL ||
        (pct_o = PyObject_GetAttr(sample, s_sm_util_pct)) == NULL) {
        goto done;
    }
    double mem_total, pct, used_d;
    if (!PyFloat_CheckExact(dt_o) || !PyTuple_CheckExact(processes) ||
        PyTuple_GET_SIZE(processes) > MAX_PROCESSES || !exact_int(total_o, &mem_total) ||
        mem_total == 0.0 || !PyLong_CheckExact(used_o) || !float_or_zero(pct_o, &pct)) {
        goto use_python;
    }
    used_d = PyLong_AsDouble(used_o);
    if (used_d == -1.0 && PyErr_Occurred()) {
        PyErr_Clear(); /* too large for a float: the reference says what happens */
        goto use_python;
    }
    double dt = PyFloat_AS_DOUBLE(dt_o);
    int64_t interval_ns, sm_pct_us, mem_byte_seconds, idle;
    if (!to_int64(py_round(dt * 1e9), &interval_ns) ||
        !to_int64(py_round(dt * pct * 1e6), &sm_pct_us) ||
        !to_int64(py_round(used_d * dt), &mem_byte_seconds)) {
        goto use_python;
    }
    Part parts[MAX_PROCESSES];
    Py_ssize_t groups = owner_parts(processes, mem_total, cost_fusd, cost_d,
                                    (double)interval_ns, dt, (int)policy, w, parts, &idle, held,
                                    &n_held);
    if (groups == -1) {
        goto done;
    }
    if (groups == -2) {
        goto use_python;
    }
    /* The window's containers are checked before anything changes: other shapes (a window
     * altered by hand) go to the reference, which accepts what Python accepts. */
    if ((owners = PyObject_GetAttr(window, s_owners)) == NULL ||
        (first = PyObject_GetAttr(window, s_first_key)) == NULL) {
        goto done;
    }
    if (!PyDict_CheckExact(owners) ||
        !(first == Py_None || (PyTuple_CheckExact(first) && PyTuple_GET_SIZE(first) == 2))) {
        goto use_python;
    }
    for (Py_ssize_t g = 0; g < groups; g++) {
        PyObject *found = PyDict_GetItemWithError(owners, parts[g].owner); /* borrowed */
        if (found == NULL && PyErr_Occurred()) {
            goto done;
        }
        if (found != NULL && !(PyList_CheckExact(found) && PyList_GET_SIZE(found) == 4)) {
            goto use_python;
        }
        totals[n_totals++] = Py_XNewRef(found); /* kept while the window is updated */
    }
    if (merge(window, sample_ids, owners, totals, first, event_id, time_ms, sample, price,
              cost_fusd, idle, interval_ns, sm_pct_us, mem_byte_seconds, parts, groups) < 0) {
        goto done;
    }
    result = Py_NewRef(Py_True);
    goto done;
use_python:
    result = fallback(window, args, settings);
done:
    for (Py_ssize_t i = 0; i < n_held; i++) {
        Py_DECREF(held[i]);
    }
    for (Py_ssize_t i = 0; i < n_totals; i++) {
        Py_XDECREF(totals[i]);
    }
    Py_XDECREF(owners);
    Py_XDECREF(first);
    Py_DECREF(sample_ids);
    Py_XDECREF(dt_o);
    Py_XDECREF(processes);
    Py_XDECREF(total_o);
    Py_XDECREF(used_o);
    Py_XDECREF(pct_o);
    return result;
}

static PyObject *init(PyObject *module, PyObject *host) {
    (void)module;
    if (!PyUnicode_CheckExact(host)) {
        PyErr_SetString(PyExc_TypeError, "init() takes the host owner name, a str");
        return NULL;
    }
    Py_XSETREF(HOST, Py_NewRef(host));
    Py_RETURN_NONE;
}

static PyMethodDef methods[] = {
    {"fold", (PyCFunction)(void (*)(void))fold, METH_FASTCALL,
     "fold(policy, sm_weight, settings, window, event_id, time_ms, sample, price, cost_fusd)"},
    {"init", init, METH_O, "init(host): the owner name of processes outside any pod"},
    {NULL, NULL, 0, NULL},
};

static struct PyModuleDef module_def = {
    PyModuleDef_HEAD_INIT, "streams._fold", "DeviceWindow.add_sample in C.", -1, methods,
    NULL, NULL, NULL, NULL,
};

#define INTERN(var, text)                                   \
    if ((var = PyUnicode_InternFromString(text)) == NULL) { \
        return NULL;                                        \
    }

PyMODINIT_FUNC PyInit__fold(void) {
    INTERN(s_sample_ids, "sample_ids");
    INTERN(s_cost_fusd, "cost_fusd");
    INTERN(s_idle_fusd, "idle_fusd");
    INTERN(s_interval_ns, "interval_ns");
    INTERN(s_sm_pct_us, "sm_pct_us");
    INTERN(s_mem_byte_seconds, "mem_byte_seconds");
    INTERN(s_owners, "owners");
    INTERN(s_first_key, "first_key");
    INTERN(s_first_sample, "first_sample");
    INTERN(s_first_price, "first_price");
    INTERN(s_interval_s, "interval_s");
    INTERN(s_processes, "processes");
    INTERN(s_mem_total_bytes, "mem_total_bytes");
    INTERN(s_mem_used_bytes, "mem_used_bytes");
    INTERN(s_sm_util_pct, "sm_util_pct");
    INTERN(s_pod_uid, "pod_uid");
    INTERN(s_add_sample, "add_sample");
    return PyModule_Create(&module_def);
}
