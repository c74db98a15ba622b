// The C++ test of libjanus: the C API behind RAII owners and exceptions, one model shared by
// 8 threads mixing understanding, generation and encoding (each equal to the reference or to a
// serial run) with a cancelled call among them, a model freed
// while another thread still generates with it, and streaming into a lambda.
//
//   test_janus_cpp EXPECTED_DIR HF_MODEL_DIR
//
// EXPECTED_DIR is the folder tests/c_abi.rs writes (see tests/c/test_janus.c).
#include "janus.h"

#include <condition_variable>
#include <cstdio>
#include <cstdlib>
#include <fstream>
#include <functional>
#include <map>
#include <memory>
#include <mutex>
#include <stdexcept>
#include <string>
#include <thread>
#include <vector>

namespace {

// ---- a thin C++ layer --------------------------------------------------------------------

struct janus_error : std::runtime_error {
    janus_status status;
    janus_error(janus_status s, const std::string &what)
        : std::runtime_error(std::string(janus_status_string(s)) + ": " + what), status(s) {}
};

void check(janus_status s) {
    if (s != JANUS_OK) throw janus_error(s, janus_last_error());
}

template <class T, janus_status (*Free)(T *)>
struct freer {
    void operator()(T *p) const { Free(p); }
};
using model_ptr = std::unique_ptr<janus_model, freer<janus_model, janus_model_free>>;
using answer_ptr = std::unique_ptr<janus_answer, freer<janus_answer, janus_answer_free>>;
using image_list_ptr =
    std::unique_ptr<janus_image_list, freer<janus_image_list, janus_image_list_free>>;

model_ptr load(const std::string &dir) {
    janus_model *m = nullptr;
    check(janus_model_load(dir.c_str(), nullptr, &m));
    return model_ptr(m);
}

std::vector<uint32_t> ids_of(const janus_answer &a) {
    return std::vector<uint32_t>(a.token_ids, a.token_ids + a.n_token_ids);
}

// Streams an answer into any callable taking the piece.
answer_ptr understand_stream(const janus_model *model, const janus_image &image,
                             const std::string &question, const janus_understand_options &opts,
                             const std::function<bool(const std::string &)> &on_piece) {
    auto trampoline = [](const char *piece, size_t len, void *user) -> bool {
        return (*static_cast<const std::function<bool(const std::string &)> *>(user))(
            std::string(piece, len));
    };
    janus_answer *a = nullptr;
    check(janus_understand_stream(model, &image, 1, question.c_str(), &opts, trampoline,
                                  const_cast<std::function<bool(const std::string &)> *>(
                                      &on_piece),
                                  &a));
    return answer_ptr(a);
}

// ---- reference files ---------------------------------------------------------------------

std::string expected_dir;
int failures = 0;

#define CHECK(cond, msg)                                                                    \
    do {                                                                                    \
        if (!(cond)) {                                                                      \
            std::fprintf(stderr, "FAIL %s:%d: %s\n", __FILE__, __LINE__,                    \
                         std::string(msg).c_str());                                         \
            failures++;                                                                     \
        }                                                                                   \
    } while (0)

std::vector<long long> ref_values(const std::string &key) {
    std::ifstream f(expected_dir + "/expected.txt");
    std::string name;
    size_t n;
    while (f >> name >> n) {
        std::vector<long long> v(n);
        for (auto &x : v) f >> x;
        if (name == key) return v;
    }
    throw std::runtime_error("no reference entry " + key);
}

std::vector<uint32_t> ref_u32(const std::string &key) {
    auto v = ref_values(key);
    return std::vector<uint32_t>(v.begin(), v.end());
}

struct rgb {
    std::vector<uint8_t> pixels;
    uint32_t width = 0, height = 0;
    janus_image view() const { return janus_image{pixels.data(), width, height, 3 * size_t(width)}; }
};

rgb ref_image(const std::string &key) {
    auto shape = ref_values(key + "_shape");
    rgb img;
    img.height = uint32_t(shape[0]);
    img.width = uint32_t(shape[1]);
    img.pixels.resize(size_t(img.width) * img.height * 3);
    std::ifstream f(expected_dir + "/" + key + ".rgb", std::ios::binary);
    f.read(reinterpret_cast<char *>(img.pixels.data()), std::streamsize(img.pixels.size()));
    if (!f) throw std::runtime_error("short reference image " + key);
    return img;
}

int max_pixel_diff(const janus_image &a, const rgb &b) {
    if (a.width != b.width || a.height != b.height) return -1;
    int worst = 0;
    for (uint32_t y = 0; y < a.height; y++)
        for (size_t x = 0; x < 3 * size_t(a.width); x++) {
            int d = std::abs(int(a.data[y * a.stride + x]) - int(b.pixels[y * 3 * b.width + x]));
            worst = std::max(worst, d);
        }
    return worst;
}

// ---- the checks --------------------------------------------------------------------------

void one_model_many_threads(const janus_model *model) {
    const rgb image = ref_image("hf_image");
    const auto want_ids = ref_u32("hf_answer_ids");
    const auto want_tokens = ref_u32("hf_gen_tokens");
    const rgb want_gen = ref_image("hf_gen_image");
    janus_understand_options uo = janus_understand_default_options();
    uo.max_new_tokens = size_t(ref_values("hf_max_new_tokens")[0]);
    janus_generate_options go = janus_generate_default_options();
    go.temperature = 0.0f;

    // The encoding of the image, computed alone first.
    janus_image encode_view = image.view();
    janus_tokens *t = nullptr;
    check(janus_encode_image(model, &encode_view, &t));
    const std::vector<uint32_t> want_codes(t->ids, t->ids + t->rows * t->cols);
    check(janus_tokens_free(t));

    std::mutex m;
    std::vector<std::string> errors;
    auto worker = [&](int i) {
        try {
            if (i == 8) {
                // A call cancelled among the others leaves the handle usable for them.
                janus_generate_options cancel = go;
                cancel.progress = [](size_t step, size_t, void *) -> bool { return step < 3; };
                janus_image_list *l = nullptr;
                janus_status st = janus_generate(model, "a photo of a cat", &cancel, &l);
                if (st != JANUS_ERR_CANCELLED || l != nullptr)
                    throw std::runtime_error("the cancelled call was not cancelled");
            } else if (i % 4 == 3) {
                janus_image view = image.view();
                janus_tokens *codes = nullptr;
                check(janus_encode_image(model, &view, &codes));
                std::vector<uint32_t> got(codes->ids, codes->ids + codes->rows * codes->cols);
                check(janus_tokens_free(codes));
                if (got != want_codes) throw std::runtime_error("encoded tokens differ");
            } else if (i % 2 == 0) {
                janus_image view = image.view();
                janus_answer *a = nullptr;
                check(janus_understand(model, &view, 1, "What is shown in this image?", &uo, &a));
                answer_ptr answer(a);
                if (ids_of(*answer) != want_ids) throw std::runtime_error("answer ids differ");
            } else {
                janus_image_list *l = nullptr;
                check(janus_generate(model, "a photo of a cat", &go, &l));
                image_list_ptr list(l);
                const auto &g = list->images[0];
                std::vector<uint32_t> got(g.tokens.ids, g.tokens.ids + g.tokens.rows * g.tokens.cols);
                if (got != want_tokens) throw std::runtime_error("image tokens differ");
                int d = max_pixel_diff(g.image, want_gen);
                if (d < 0 || d > 1) throw std::runtime_error("pixels differ");
            }
        } catch (const std::exception &e) {
            std::lock_guard<std::mutex> lock(m);
            errors.push_back("thread " + std::to_string(i) + ": " + e.what());
        }
    };
    std::vector<std::thread> threads;
    for (int i = 0; i < 9; i++) threads.emplace_back(worker, i);
    for (auto &th : threads) th.join();
    for (const auto &e : errors) CHECK(false, e);
    std::printf("ok: one model, 8 threads (answering, generating, encoding) equal to the "
                "reference and to a serial run, and a cancelled call among them\n");
}

void streaming_into_a_lambda(const janus_model *model) {
    const rgb image = ref_image("hf_image");
    janus_understand_options uo = janus_understand_default_options();
    uo.max_new_tokens = size_t(ref_values("hf_max_new_tokens")[0]);
    std::string text;
    int pieces = 0;
    auto answer = understand_stream(model, image.view(), "What is shown in this image?", uo,
                                    [&](const std::string &piece) {
                                        text += piece;
                                        pieces++;
                                        return true;
                                    });
    CHECK(text == std::string(answer->text, answer->text_len), "streamed text differs");
    CHECK(ids_of(*answer) == ref_u32("hf_answer_ids"), "streamed answer ids differ");
    try {
        understand_stream(model, image.view(), "What is shown in this image?", uo,
                          [](const std::string &) { return false; });
        CHECK(text.empty(), "a stream with text was not cancelled");
    } catch (const janus_error &e) {
        CHECK(e.status == JANUS_ERR_CANCELLED, e.what());
    }
    std::printf("ok: streaming (%d pieces) and cancelling from a lambda\n", pieces);
}

// A model freed while another thread generates with it: the running call finishes normally,
// later calls are refused.
void free_while_in_use(const std::string &dir) {
    janus_model *model = nullptr;
    check(janus_model_load(dir.c_str(), nullptr, &model));

    struct sync_state {
        std::mutex m;
        std::condition_variable cv;
        bool started = false, freed = false;
    } sync;
    janus_generate_options go = janus_generate_default_options();
    go.temperature = 0.0f;
    go.user_data = &sync;
    go.progress = [](size_t step, size_t, void *user) -> bool {
        auto *s = static_cast<sync_state *>(user);
        if (step == 1) {
            std::unique_lock<std::mutex> lock(s->m);
            s->started = true;
            s->cv.notify_all();
            s->cv.wait(lock, [&] { return s->freed; });
        }
        return true;
    };
    janus_status generated = JANUS_ERR_INTERNAL;
    janus_image_list *list = nullptr;
    std::thread t([&] { generated = janus_generate(model, "a photo of a cat", &go, &list); });
    {
        std::unique_lock<std::mutex> lock(sync.m);
        sync.cv.wait(lock, [&] { return sync.started; });
        CHECK(janus_model_free(model) == JANUS_OK, "free while in use");
        sync.freed = true;
        sync.cv.notify_all();
    }
    t.join();
    CHECK(generated == JANUS_OK, "the running call failed after the free");
    image_list_ptr owned(list);
    if (list) {
        const auto &g = list->images[0];
        std::vector<uint32_t> got(g.tokens.ids, g.tokens.ids + g.tokens.rows * g.tokens.cols);
        CHECK(got == ref_u32("hf_gen_tokens"), "tokens of the call that outlived the free");
    }
    size_t rows, cols;
    CHECK(janus_model_grid(model, &rows, &cols) == JANUS_ERR_INVALID_HANDLE,
          "a freed model was used");
    CHECK(janus_model_free(model) == JANUS_ERR_INVALID_HANDLE, "double free not reported");
    std::printf("ok: model freed while another thread generates\n");
}

void errors_as_exceptions(const std::string &dir) {
    try {
        load(dir + "/no-such-model");
        CHECK(false, "loading a missing folder succeeded");
    } catch (const janus_error &e) {
        CHECK(e.status == JANUS_ERR_IO || e.status == JANUS_ERR_MISSING_FILE, e.what());
    }
    // Each thread has its own message.
    janus_model *m = nullptr;
    janus_model_load(nullptr, nullptr, &m);
    std::string here = janus_last_error();
    std::string there;
    std::thread([&] { there = janus_last_error(); }).join();
    CHECK(!here.empty() && there.empty(), "the error message is not per thread");
    std::printf("ok: errors as exceptions, per-thread messages\n");
}

}  // namespace

int main(int argc, char **argv) {
    if (argc < 3) {
        std::fprintf(stderr, "usage: %s EXPECTED_DIR HF_MODEL_DIR\n", argv[0]);
        return 2;
    }
    expected_dir = argv[1];
    const std::string dir = argv[2];
    try {
        model_ptr model = load(dir);
        one_model_many_threads(model.get());
        streaming_into_a_lambda(model.get());
        free_while_in_use(dir);
        errors_as_exceptions(dir);
    } catch (const std::exception &e) {
        std::fprintf(stderr, "FAIL: %s\n", e.what());
        return 1;
    }
    if (failures) {
        std::fprintf(stderr, "%d check(s) failed\n", failures);
        return 1;
    }
    std::printf("all C++ checks passed\n");
    return 0;
}
