/*
 * The C test of libjanus: runs the tiny test checkpoints through the C API and compares with
 * the reference outputs (extracted by tests/c_abi.rs into plain files), then checks the error
 * paths: NULL arguments, bad paths and options, cancellation, freed handles and double frees,
 * and hostile input: overflowing sizes, limits, non-finite logits, devices, failed writes.
 *
 *   test_janus EXPECTED_DIR HF_MODEL_DIR [ORIGINAL_MODEL_DIR]
 *
 * EXPECTED_DIR holds `expected.txt` (lines `key n v1 ... vn` of integers) and raw RGB8 images
 * `<key>.rgb` whose shape is the `<key>_shape` entry (height, width). Without
 * ORIGINAL_MODEL_DIR only the Hugging Face-layout checks run (the short run under valgrind).
 */
#define _XOPEN_SOURCE 700 /* mkdtemp, setrlimit */
#include "janus.h"

#include <signal.h>
#include <stddef.h>
#include <stdint.h>
#include <stdio.h>
#include <stdlib.h>
#include <string.h>
#include <sys/resource.h>

static int failures = 0;

#define CHECK(cond, ...)                                                        \
    do {                                                                        \
        if (!(cond)) {                                                          \
            fprintf(stderr, "FAIL %s:%d: ", __FILE__, __LINE__);                \
            fprintf(stderr, __VA_ARGS__);                                       \
            fprintf(stderr, "\n");                                              \
            failures++;                                                         \
        }                                                                       \
    } while (0)

/* A call that must succeed: stop at once when it does not. */
#define MUST(call)                                                              \
    do {                                                                        \
        janus_status st_ = (call);                                              \
        if (st_ != JANUS_OK) {                                                  \
            fprintf(stderr, "FAIL %s:%d: %s -> %s: %s\n", __FILE__, __LINE__,   \
                    #call, janus_status_string(st_), janus_last_error());       \
            exit(1);                                                            \
        }                                                                       \
    } while (0)

/* A call that must fail with `want` and leave a message. */
#define EXPECT_STATUS(call, want)                                               \
    do {                                                                        \
        janus_status st_ = (call);                                              \
        CHECK(st_ == (want), "%s -> %s, expected %s (%s)", #call,               \
              janus_status_string(st_), janus_status_string(want),              \
              janus_last_error());                                              \
        CHECK(st_ == JANUS_OK || janus_last_error()[0] != '\0',                 \
              "%s left no error message", #call);                               \
    } while (0)

/* ---- reference files ------------------------------------------------------------------- */

typedef struct {
    size_t n;
    long long *v;
} ints;

static const char *expected_dir;

static ints ref_ints(const char *key) {
    char path[4096];
    snprintf(path, sizeof path, "%s/expected.txt", expected_dir);
    FILE *f = fopen(path, "r");
    if (!f) {
        fprintf(stderr, "cannot open %s\n", path);
        exit(1);
    }
    char name[256];
    size_t n;
    while (fscanf(f, "%255s %zu", name, &n) == 2) {
        long long *v = calloc(n ? n : 1, sizeof *v);
        for (size_t i = 0; i < n; i++) {
            if (fscanf(f, "%lld", &v[i]) != 1) {
                fprintf(stderr, "%s: bad entry %s\n", path, name);
                exit(1);
            }
        }
        if (strcmp(name, key) == 0) {
            fclose(f);
            return (ints){n, v};
        }
        free(v);
    }
    fclose(f);
    fprintf(stderr, "%s: no entry %s\n", path, key);
    exit(1);
}

static long long ref_int(const char *key) {
    ints r = ref_ints(key);
    long long v = r.v[0];
    free(r.v);
    return v;
}

/* A reference image, as a janus_image whose rows are `pad` bytes longer than the pixels. */
static janus_image ref_image(const char *key, size_t pad) {
    char shape_key[300];
    snprintf(shape_key, sizeof shape_key, "%s_shape", key);
    ints shape = ref_ints(shape_key);
    uint32_t h = (uint32_t)shape.v[0], w = (uint32_t)shape.v[1];
    free(shape.v);
    char path[4096];
    snprintf(path, sizeof path, "%s/%s.rgb", expected_dir, key);
    FILE *f = fopen(path, "rb");
    if (!f) {
        fprintf(stderr, "cannot open %s\n", path);
        exit(1);
    }
    size_t stride = 3 * (size_t)w + pad;
    uint8_t *data = calloc((size_t)h * stride, 1);
    for (uint32_t y = 0; y < h; y++) {
        if (fread(data + y * stride, 1, 3 * (size_t)w, f) != 3 * (size_t)w) {
            fprintf(stderr, "%s: short file\n", path);
            exit(1);
        }
    }
    fclose(f);
    return (janus_image){data, w, h, stride};
}

/* Largest per-channel difference between two images of the same size (-1 if sizes differ). */
static int max_pixel_diff(const janus_image *a, const janus_image *b) {
    if (a->width != b->width || a->height != b->height) return -1;
    int worst = 0;
    for (uint32_t y = 0; y < a->height; y++) {
        for (size_t x = 0; x < 3 * (size_t)a->width; x++) {
            int d = (int)a->data[y * a->stride + x] - (int)b->data[y * b->stride + x];
            if (d < 0) d = -d;
            if (d > worst) worst = d;
        }
    }
    return worst;
}

static int ids_equal(const uint32_t *got, size_t n_got, const ints *want) {
    if (n_got != want->n) return 0;
    for (size_t i = 0; i < n_got; i++)
        if ((long long)got[i] != want->v[i]) return 0;
    return 1;
}

/* ---- callbacks ------------------------------------------------------------------------- */

typedef struct {
    char text[4096];
    size_t len;
    size_t calls;
    size_t cancel_after; /* 0: never */
} stream_state;

static bool on_text(const char *piece, size_t len, void *user_data) {
    stream_state *s = user_data;
    CHECK(strlen(piece) == len, "piece is not NUL-terminated at len");
    if (s->len + len < sizeof s->text) {
        memcpy(s->text + s->len, piece, len);
        s->len += len;
        s->text[s->len] = '\0';
    }
    s->calls++;
    return s->cancel_after == 0 || s->calls < s->cancel_after;
}

typedef struct {
    size_t last_step;
    size_t total;
    size_t calls;
    size_t cancel_at; /* 0: never */
} progress_state;

static bool on_progress(size_t step, size_t total, void *user_data) {
    progress_state *p = user_data;
    CHECK(step == p->last_step + 1, "progress step %zu after %zu", step, p->last_step);
    p->last_step = step;
    p->total = total;
    p->calls++;
    return p->cancel_at == 0 || step < p->cancel_at;
}

/* ---- checks without a model ------------------------------------------------------------ */

static void check_errors_without_a_model(const char *out_dir) {
    CHECK(strlen(janus_version()) > 0, "empty version");
    CHECK(strcmp(janus_status_string(JANUS_ERR_CANCELLED), "JANUS_ERR_CANCELLED") == 0,
          "status string");
    CHECK(strcmp(janus_status_string(999), "unknown status") == 0, "unknown status string");

    janus_model *model = (janus_model *)0x1;
    EXPECT_STATUS(janus_model_load(NULL, NULL, &model), JANUS_ERR_INVALID_ARGUMENT);
    CHECK(model == NULL, "out_model not cleared on failure");
    CHECK(strstr(janus_last_error(), "path") != NULL, "message does not name path: %s",
          janus_last_error());
    EXPECT_STATUS(janus_model_load("x", NULL, NULL), JANUS_ERR_INVALID_ARGUMENT);

    /* A folder that does not exist. */
    char missing[4096];
    snprintf(missing, sizeof missing, "%s/no-such-model", out_dir);
    janus_status st = janus_model_load(missing, NULL, &model);
    CHECK(st == JANUS_ERR_IO || st == JANUS_ERR_MISSING_FILE, "missing folder -> %s",
          janus_status_string(st));
    CHECK(strstr(janus_last_error(), "no-such-model") != NULL,
          "message does not name the folder: %s", janus_last_error());
    CHECK(model == NULL, "out_model set on failure");

    /* Options that were not initialised, or hold unknown values. */
    janus_load_options lo = janus_load_default_options();
    CHECK(lo.struct_size == sizeof lo, "struct_size %zu", lo.struct_size);
    lo.struct_size = 0;
    EXPECT_STATUS(janus_model_load(missing, &lo, &model), JANUS_ERR_INVALID_ARGUMENT);
    lo = janus_load_default_options();
    lo.backend = 99;
    EXPECT_STATUS(janus_model_load(missing, &lo, &model), JANUS_ERR_INVALID_ARGUMENT);
    lo = janus_load_default_options();
    lo.dtype = 7;
    EXPECT_STATUS(janus_model_load(missing, &lo, &model), JANUS_ERR_INVALID_ARGUMENT);
    lo = janus_load_default_options();
    lo.weights = 42;
    EXPECT_STATUS(janus_model_load(missing, &lo, &model), JANUS_ERR_INVALID_ARGUMENT);
    /* A caller built against the header before `weights` existed: the field is not read. */
    lo.struct_size = offsetof(janus_load_options, weights);
    st = janus_model_load(missing, &lo, &model);
    CHECK(st == JANUS_ERR_IO || st == JANUS_ERR_MISSING_FILE, "old struct_size -> %s",
          janus_status_string(st));

    /* NULL model. */
    janus_answer *answer = (janus_answer *)0x1;
    EXPECT_STATUS(janus_understand(NULL, NULL, 0, "hi", NULL, &answer),
                  JANUS_ERR_INVALID_ARGUMENT);
    CHECK(answer == NULL, "out_answer not cleared");
    CHECK(strstr(janus_last_error(), "model") != NULL, "message: %s", janus_last_error());
    janus_image_list *list = NULL;
    EXPECT_STATUS(janus_generate(NULL, "a cat", NULL, &list), JANUS_ERR_INVALID_ARGUMENT);
    size_t rows, cols;
    EXPECT_STATUS(janus_model_grid(NULL, &rows, &cols), JANUS_ERR_INVALID_ARGUMENT);

    /* Freeing NULL is a no-op and clears the message. */
    MUST(janus_model_free(NULL));
    CHECK(janus_last_error()[0] == '\0', "message after success: %s", janus_last_error());
    MUST(janus_answer_free(NULL));
    MUST(janus_image_free(NULL));
    MUST(janus_image_list_free(NULL));
    MUST(janus_tokens_free(NULL));

    /* A pointer that never came from the library. */
    janus_answer fake;
    memset(&fake, 0, sizeof fake);
    EXPECT_STATUS(janus_answer_free(&fake), JANUS_ERR_INVALID_HANDLE);

    /* Image files. */
    janus_image *img = (janus_image *)0x1;
    EXPECT_STATUS(janus_image_read(missing, &img), JANUS_ERR_IO);
    CHECK(img == NULL, "out_image not cleared");
    uint8_t px[12] = {0};
    janus_image small = {px, 2, 2, 6};
    char bad_path[4096];
    snprintf(bad_path, sizeof bad_path, "%s/no-such-dir/x.png", out_dir);
    EXPECT_STATUS(janus_image_write_png(&small, bad_path), JANUS_ERR_IO);
    small.stride = 5;
    EXPECT_STATUS(janus_image_write_png(&small, bad_path), JANUS_ERR_INVALID_INPUT);
}

/* ---- Hugging Face layout --------------------------------------------------------------- */

static void check_hf(const char *model_dir, const char *out_dir) {
    janus_model *model = NULL;
    janus_load_options lo = janus_load_default_options();
    MUST(janus_model_load(model_dir, &lo, &model));
    /* f32 files: `auto` computes in f32. */
    janus_dtype dtype = JANUS_DTYPE_AUTO;
    MUST(janus_model_dtype(model, &dtype));
    CHECK(dtype == JANUS_DTYPE_F32, "dtype %u", (unsigned)dtype);

    size_t rows = 0, cols = 0;
    MUST(janus_model_grid(model, &rows, &cols));
    ints gen_tokens = ref_ints("hf_gen_tokens");
    CHECK(rows * cols == gen_tokens.n, "grid %zux%zu, reference has %zu tokens", rows, cols,
          gen_tokens.n);

    /* Understanding: greedy answer and prompt length, with padded rows. */
    janus_image image = ref_image("hf_image", 5);
    ints want_ids = ref_ints("hf_answer_ids");
    janus_understand_options uo = janus_understand_default_options();
    uo.max_new_tokens = (size_t)ref_int("hf_max_new_tokens");
    const char *question = "What is shown in this image?";
    janus_answer *answer = NULL;
    MUST(janus_understand(model, &image, 1, question, &uo, &answer));
    CHECK(ids_equal(answer->token_ids, answer->n_token_ids, &want_ids),
          "hf answer ids differ from the reference");
    CHECK(answer->prompt_tokens == (size_t)ref_int("hf_prompt_tokens"), "prompt tokens %zu",
          answer->prompt_tokens);
    CHECK(strlen(answer->text) == answer->text_len, "text_len");

    /* Streaming gives the same answer, piece by piece. */
    stream_state s = {0};
    janus_answer *streamed = NULL;
    MUST(janus_understand_stream(model, &image, 1, question, &uo, on_text, &s, &streamed));
    CHECK(ids_equal(streamed->token_ids, streamed->n_token_ids, &want_ids), "stream ids");
    CHECK(strcmp(s.text, answer->text) == 0, "streamed \"%s\" != answer \"%s\"", s.text,
          answer->text);
    MUST(janus_answer_free(streamed));

    /* Double free of an answer is reported, not performed. */
    MUST(janus_answer_free(answer));
    EXPECT_STATUS(janus_answer_free(answer), JANUS_ERR_INVALID_HANDLE);

    /* Cancelling from the stream. */
    janus_image black;
    uint8_t black_px[8 * 8 * 3] = {0};
    black = (janus_image){black_px, 8, 8, 24};
    stream_state cancel = {0};
    cancel.cancel_after = 1;
    uo.max_new_tokens = 3;
    answer = (janus_answer *)0x1;
    EXPECT_STATUS(janus_understand_stream(model, &black, 1, "what?", &uo, on_text, &cancel,
                                          &answer),
                  JANUS_ERR_CANCELLED);
    CHECK(cancel.calls == 1, "stream went on after cancel (%zu calls)", cancel.calls);
    CHECK(answer == NULL, "answer set after cancel");
    EXPECT_STATUS(janus_understand_stream(model, &black, 1, "what?", &uo, NULL, NULL, &answer),
                  JANUS_ERR_INVALID_ARGUMENT);

    /* Bad input. */
    janus_understand_options bad = janus_understand_default_options();
    bad.temperature = -1.0f;
    EXPECT_STATUS(janus_understand(model, &image, 1, question, &bad, &answer),
                  JANUS_ERR_INVALID_INPUT);
    bad = janus_understand_default_options();
    bad.max_new_tokens = 0;
    EXPECT_STATUS(janus_understand(model, &image, 1, question, &bad, &answer),
                  JANUS_ERR_INVALID_INPUT);
    janus_image narrow = image;
    narrow.stride = 3 * (size_t)image.width - 1;
    EXPECT_STATUS(janus_understand(model, &narrow, 1, question, &uo, &answer),
                  JANUS_ERR_INVALID_INPUT);
    janus_image empty = {black_px, 0, 8, 24};
    EXPECT_STATUS(janus_understand(model, &empty, 1, question, &uo, &answer),
                  JANUS_ERR_INVALID_INPUT);
    EXPECT_STATUS(janus_understand(model, NULL, 1, question, &uo, &answer),
                  JANUS_ERR_INVALID_ARGUMENT);
    EXPECT_STATUS(janus_understand(model, &image, 1, "\xff\xfe", &uo, &answer),
                  JANUS_ERR_INVALID_ARGUMENT);
    EXPECT_STATUS(janus_understand(model, &image, 1, NULL, &uo, &answer),
                  JANUS_ERR_INVALID_ARGUMENT);
    EXPECT_STATUS(janus_understand(model, NULL, 0, "<image_placeholder> what?", &uo, &answer),
                  JANUS_ERR_INVALID_INPUT);

    /* Greedy generation: two images per call, both the reference's, with progress. */
    janus_image want_gen = ref_image("hf_gen_image", 0);
    janus_generate_options go = janus_generate_default_options();
    go.count = 2;
    go.temperature = 0.0f;
    progress_state p = {0};
    go.progress = on_progress;
    go.user_data = &p;
    janus_image_list *list = NULL;
    MUST(janus_generate(model, "a photo of a cat", &go, &list));
    CHECK(list->count == 2, "count %zu", list->count);
    CHECK(p.calls == rows * cols && p.total == rows * cols, "progress: %zu calls, total %zu",
          p.calls, p.total);
    for (size_t i = 0; i < list->count; i++) {
        const janus_generated_image *g = &list->images[i];
        CHECK(g->tokens.rows == rows && g->tokens.cols == cols, "token grid shape");
        CHECK(ids_equal(g->tokens.ids, g->tokens.rows * g->tokens.cols, &gen_tokens),
              "image %zu: tokens differ from the reference", i);
        int d = max_pixel_diff(&g->image, &want_gen);
        CHECK(d >= 0 && d <= 1, "image %zu: pixels differ by %d", i, d);
        CHECK(g->image.stride == 3 * (size_t)g->image.width, "stride");
    }

    /* The PNG writer and reader round-trip the pixels. */
    char png[4096];
    snprintf(png, sizeof png, "%s/generated.png", out_dir);
    MUST(janus_image_write_png(&list->images[0].image, png));
    janus_image *back = NULL;
    MUST(janus_image_read(png, &back));
    CHECK(max_pixel_diff(back, &list->images[0].image) == 0, "PNG round trip");
    MUST(janus_image_free(back));
    EXPECT_STATUS(janus_image_free(back), JANUS_ERR_INVALID_HANDLE);

    /* An image inside a list is not freed on its own; the list is freed once. */
    EXPECT_STATUS(janus_image_free((janus_image *)&list->images[0].image),
                  JANUS_ERR_INVALID_HANDLE);
    MUST(janus_image_list_free(list));
    EXPECT_STATUS(janus_image_list_free(list), JANUS_ERR_INVALID_HANDLE);

    /* The prompt reaches the model through the checkpoint's chat template: another prompt gives
       other tokens (greedy, so nothing else differs). */
    go = janus_generate_default_options();
    go.temperature = 0.0f;
    MUST(janus_generate(model, "a red fox in the snow", &go, &list));
    CHECK(!ids_equal(list->images[0].tokens.ids,
                     list->images[0].tokens.rows * list->images[0].tokens.cols, &gen_tokens),
          "another prompt gave the reference's tokens of \"a photo of a cat\"");
    MUST(janus_image_list_free(list));

    /* Cancelling generation from the progress callback. */
    progress_state stop = {0};
    stop.cancel_at = 3;
    go = janus_generate_default_options();
    go.temperature = 0.0f;
    go.progress = on_progress;
    go.user_data = &stop;
    list = (janus_image_list *)0x1;
    EXPECT_STATUS(janus_generate(model, "a cat", &go, &list), JANUS_ERR_CANCELLED);
    CHECK(stop.last_step == 3, "cancelled at step %zu", stop.last_step);
    CHECK(list == NULL, "list set after cancel");
    go = janus_generate_default_options();
    go.cfg_weight = 0.0f / 0.0f;
    EXPECT_STATUS(janus_generate(model, "a cat", &go, &list), JANUS_ERR_INVALID_INPUT);
    go = janus_generate_default_options();
    go.count = 0;
    EXPECT_STATUS(janus_generate(model, "a cat", &go, &list), JANUS_ERR_INVALID_INPUT);
    EXPECT_STATUS(janus_generate(model, "   ", NULL, &list), JANUS_ERR_INVALID_INPUT);

    /* Decoding the reference tokens gives the reference pixels. */
    uint32_t *ids = malloc(gen_tokens.n * sizeof *ids);
    for (size_t i = 0; i < gen_tokens.n; i++) ids[i] = (uint32_t)gen_tokens.v[i];
    janus_tokens grid = {ids, rows, cols};
    janus_image *decoded = NULL;
    MUST(janus_decode_image(model, &grid, &decoded));
    int d = max_pixel_diff(decoded, &want_gen);
    CHECK(d >= 0 && d <= 1, "decoded pixels differ by %d", d);

    /* Encoding: a grid of the model's shape, the same every time. */
    janus_tokens *t1 = NULL, *t2 = NULL;
    MUST(janus_encode_image(model, decoded, &t1));
    MUST(janus_encode_image(model, &image, &t2));
    CHECK(t1->rows == rows && t1->cols == cols, "encoded grid %zux%zu", t1->rows, t1->cols);
    MUST(janus_tokens_free(t2));
    MUST(janus_encode_image(model, decoded, &t2));
    CHECK(memcmp(t1->ids, t2->ids, rows * cols * sizeof *ids) == 0, "encoding not repeatable");
    MUST(janus_tokens_free(t1));
    MUST(janus_tokens_free(t2));
    EXPECT_STATUS(janus_tokens_free(t2), JANUS_ERR_INVALID_HANDLE);
    MUST(janus_image_free(decoded));

    /* Grids of another shape, NULL ids. */
    uint32_t *more = calloc((rows + 1) * cols, sizeof *more);
    janus_tokens taller = {more, rows + 1, cols};
    EXPECT_STATUS(janus_decode_image(model, &taller, &decoded), JANUS_ERR_INVALID_INPUT);
    free(more);
    grid.rows = rows;
    grid.ids = NULL;
    EXPECT_STATUS(janus_decode_image(model, &grid, &decoded), JANUS_ERR_INVALID_ARGUMENT);
    EXPECT_STATUS(janus_encode_image(model, &empty, &t1), JANUS_ERR_INVALID_INPUT);

    /* A freed model handle is reported, not used. */
    MUST(janus_model_free(model));
    EXPECT_STATUS(janus_understand(model, &image, 1, question, &uo, &answer),
                  JANUS_ERR_INVALID_HANDLE);
    EXPECT_STATUS(janus_model_grid(model, &rows, &cols), JANUS_ERR_INVALID_HANDLE);
    EXPECT_STATUS(janus_model_free(model), JANUS_ERR_INVALID_HANDLE);

    free(ids);
    free(gen_tokens.v);
    free(want_ids.v);
    free((void *)image.data);
    free((void *)want_gen.data);
    printf("ok: hf-tiny (understanding, streaming, generation, encode/decode, errors)\n");
}

/* ---- hostile input --------------------------------------------------------------------- */

static int file_equals(const char *path, const char *want, size_t n) {
    FILE *f = fopen(path, "rb");
    if (!f) return 0;
    char buf[256];
    size_t got = fread(buf, 1, sizeof buf, f);
    fclose(f);
    return got == n && memcmp(buf, want, n) == 0;
}

static void check_hardening(const char *model_dir) {
    janus_load_options lo = janus_load_default_options();
    CHECK(lo.limits.max_images == 8 && lo.limits.max_image_pixels == 50000000 &&
              lo.limits.max_count == 64 && lo.limits.max_input_mb == 64,
          "default limits");
    janus_model *model = NULL;
    lo.limits.max_count = 0;
    EXPECT_STATUS(janus_model_load(model_dir, &lo, &model), JANUS_ERR_INVALID_INPUT);
    lo.limits.max_count = 2;
    lo.limits.max_images = 1;
    MUST(janus_model_load(model_dir, &lo, &model));

    uint8_t px[16 * 16 * 3];
    memset(px, 100, sizeof px);
    janus_image image = {px, 16, 16, 16 * 3};
    janus_image two[2] = {image, image};
    janus_answer *answer = (janus_answer *)0x1;
    janus_understand_options uo = janus_understand_default_options();
    /* An overflowing max_new_tokens does not wrap the context check. */
    uo.max_new_tokens = SIZE_MAX;
    EXPECT_STATUS(janus_understand(model, &image, 1, "what?", &uo, &answer),
                  JANUS_ERR_INVALID_INPUT);
    CHECK(answer == NULL, "out_answer not cleared");
    uo = janus_understand_default_options();
    uo.max_new_tokens = 2;
    /* An empty question, and more images than the handle's max_images. */
    EXPECT_STATUS(janus_understand(model, &image, 1, "", &uo, &answer), JANUS_ERR_INVALID_INPUT);
    EXPECT_STATUS(janus_understand(model, two, 2, "what?", &uo, &answer),
                  JANUS_ERR_INVALID_INPUT);
    CHECK(strstr(janus_last_error(), "max_images") != NULL, "message: %s", janus_last_error());

    /* count past max_count; a guidance weight that overflows the logits. */
    janus_image_list *list = (janus_image_list *)0x1;
    janus_generate_options go = janus_generate_default_options();
    go.count = 3;
    EXPECT_STATUS(janus_generate(model, "a cat", &go, &list), JANUS_ERR_INVALID_INPUT);
    CHECK(strstr(janus_last_error(), "max_count") != NULL, "message: %s", janus_last_error());
    go = janus_generate_default_options();
    go.cfg_weight = 3.4e38f;
    EXPECT_STATUS(janus_generate(model, "a cat", &go, &list), JANUS_ERR_NUMERIC);
    CHECK(strstr(janus_last_error(), "non-finite logits at step 1") != NULL, "message: %s",
          janus_last_error());
    CHECK(list == NULL, "out_list not cleared");
    CHECK(strcmp(janus_status_string(JANUS_ERR_NUMERIC), "JANUS_ERR_NUMERIC") == 0 &&
              strcmp(janus_status_string(JANUS_ERR_OUT_OF_MEMORY), "JANUS_ERR_OUT_OF_MEMORY") == 0,
          "status names");
    /* The handle is still usable after those failures. */
    MUST(janus_understand(model, &image, 1, "what?", &uo, &answer));
    MUST(janus_answer_free(answer));
    MUST(janus_model_free(model));

    /* A device where a file is expected. */
    janus_image *read = (janus_image *)0x1;
    EXPECT_STATUS(janus_image_read("/dev/zero", &read), JANUS_ERR_INVALID_INPUT);
    CHECK(strstr(janus_last_error(), "regular file") != NULL, "message: %s", janus_last_error());
    CHECK(read == NULL, "out_image not cleared");

    /* A write that fails (the file-size limit stands for a full disk) is an error, says so, and
     * leaves the existing file as it was. */
    char dir[] = "/tmp/janus-c-test-XXXXXX";
    CHECK(mkdtemp(dir) != NULL, "mkdtemp");
    char path[512];
    snprintf(path, sizeof path, "%s/out.png", dir);
    const char old[] = "an older image";
    FILE *f = fopen(path, "wb");
    CHECK(f != NULL, "create %s", path);
    if (f) {
        fwrite(old, 1, sizeof old, f);
        fclose(f);
    }
    struct rlimit before, small = {64, 64};
    getrlimit(RLIMIT_FSIZE, &before);
    void (*previous)(int) = signal(SIGXFSZ, SIG_IGN);
    small.rlim_max = before.rlim_max;
    setrlimit(RLIMIT_FSIZE, &small);
    janus_status st = janus_image_write_png(&image, path);
    setrlimit(RLIMIT_FSIZE, &before);
    signal(SIGXFSZ, previous);
    CHECK(st == JANUS_ERR_IO, "failed write -> %s", janus_status_string(st));
    CHECK(strstr(janus_last_error(), "cannot write") != NULL, "message: %s", janus_last_error());
    CHECK(file_equals(path, old, sizeof old), "the existing file was changed");
    MUST(janus_image_write_png(&image, path));
    MUST(janus_image_read(path, &read));
    CHECK(read->width == 16 && read->height == 16, "read back %ux%u", read->width, read->height);
    MUST(janus_image_free(read));
    remove(path);
    CHECK(remove(dir) == 0, "files left behind in %s", dir);
    printf("ok: hostile input (limits, overflow, non-finite logits, devices, failed writes)\n");
}

/* ---- original DeepSeek layout ---------------------------------------------------------- */

static void check_original(const char *model_dir) {
    janus_model *model = NULL;
    /* Quantized weights compute in f32 only. */
    janus_load_options lo = janus_load_default_options();
    lo.weights = JANUS_WEIGHTS_Q8_0;
    lo.dtype = JANUS_DTYPE_BF16;
    EXPECT_STATUS(janus_model_load(model_dir, &lo, &model), JANUS_ERR_INVALID_INPUT);
    CHECK(model == NULL, "out_model set on failure");

    /* The official code's outputs are f32 ones: compute in f32 (`auto` would take bf16 on a CPU
     * with bf16 instructions, this checkpoint being bf16). */
    lo = janus_load_default_options();
    CHECK(lo.dtype == JANUS_DTYPE_AUTO, "default dtype %u", (unsigned)lo.dtype);
    lo.dtype = JANUS_DTYPE_F32;
    MUST(janus_model_load(model_dir, &lo, &model));
    janus_dtype dtype = JANUS_DTYPE_AUTO;
    MUST(janus_model_dtype(model, &dtype));
    CHECK(dtype == JANUS_DTYPE_F32, "dtype %u", (unsigned)dtype);
    EXPECT_STATUS(janus_model_dtype(model, NULL), JANUS_ERR_INVALID_ARGUMENT);
    size_t rows, cols;
    MUST(janus_model_grid(model, &rows, &cols));
    /* The checkpoint is bf16: `auto` keeps it so on the CPU. */
    janus_weights weights = JANUS_WEIGHTS_AUTO;
    size_t weight_bytes = 0;
    MUST(janus_model_weights(model, &weights, &weight_bytes));
    CHECK(weights == JANUS_WEIGHTS_BF16, "weights %u", (unsigned)weights);
    CHECK(weight_bytes > 0, "no weight bytes");
    MUST(janus_model_weights(model, &weights, NULL));
    EXPECT_STATUS(janus_model_weights(model, NULL, NULL), JANUS_ERR_INVALID_ARGUMENT);

    /* Understanding of the reference image (already at the model's size). */
    janus_image image = ref_image("orig_image", 0);
    ints want_ids = ref_ints("orig_answer_ids");
    janus_understand_options uo = janus_understand_default_options();
    uo.max_new_tokens = (size_t)ref_int("orig_max_new_tokens");
    janus_answer *answer = NULL;
    MUST(janus_understand(model, &image, 1, "What is shown in this image?", &uo, &answer));
    CHECK(ids_equal(answer->token_ids, answer->n_token_ids, &want_ids),
          "original answer ids differ from the reference");
    CHECK(answer->prompt_tokens == (size_t)ref_int("orig_prompt_tokens"), "prompt tokens %zu",
          answer->prompt_tokens);
    MUST(janus_answer_free(answer));

    /* Encoding with the official quantizer: equal but for recorded near-ties. */
    ints want_codes = ref_ints("orig_encode_tokens");
    ints ties = ref_ints("orig_encode_near_ties");
    janus_tokens *tokens = NULL;
    MUST(janus_encode_image(model, &image, &tokens));
    CHECK(tokens->rows * tokens->cols == want_codes.n, "encoded %zu codes", tokens->rows *
          tokens->cols);
    size_t differ = 0;
    for (size_t i = 0; i < want_codes.n && i < tokens->rows * tokens->cols; i++) {
        if ((long long)tokens->ids[i] == want_codes.v[i]) continue;
        int tie = 0;
        for (size_t j = 0; j < ties.n; j++) tie |= ties.v[j] == (long long)i;
        CHECK(tie, "code %zu: %u, reference %lld", i, tokens->ids[i], want_codes.v[i]);
        differ++;
    }
    MUST(janus_tokens_free(tokens));

    /* Greedy generation: the official code's tokens and pixels. */
    ints gen_tokens = ref_ints("orig_gen_tokens");
    janus_image want_gen = ref_image("orig_gen_image", 0);
    janus_generate_options go = janus_generate_default_options();
    go.temperature = 0.0f;
    janus_image_list *list = NULL;
    MUST(janus_generate(model, "a photo of a cat", &go, &list));
    CHECK(list->count == 1, "count");
    const janus_generated_image *g = &list->images[0];
    CHECK(g->tokens.rows == rows && g->tokens.cols == cols, "grid");
    CHECK(ids_equal(g->tokens.ids, rows * cols, &gen_tokens), "generated tokens differ");
    int d = max_pixel_diff(&g->image, &want_gen);
    CHECK(d >= 0 && d <= 1, "generated pixels differ by %d", d);
    MUST(janus_image_list_free(list));

    MUST(janus_model_free(model));
    free(want_ids.v);
    free(want_codes.v);
    free(ties.v);
    free(gen_tokens.v);
    free((void *)image.data);
    free((void *)want_gen.data);
    printf("ok: original-tiny (understanding, encoding: %zu near-ties, generation)\n", differ);
}

int main(int argc, char **argv) {
    if (argc < 3) {
        fprintf(stderr, "usage: %s EXPECTED_DIR HF_MODEL_DIR [ORIGINAL_MODEL_DIR]\n", argv[0]);
        return 2;
    }
    expected_dir = argv[1];
    check_errors_without_a_model(expected_dir);
    check_hf(argv[2], expected_dir);
    check_hardening(argv[2]);
    if (argc > 3) check_original(argv[3]);
    if (failures) {
        fprintf(stderr, "%d check(s) failed\n", failures);
        return 1;
    }
    printf("all C checks passed\n");
    return 0;
}
