// Answers a question about an image, then generates an image from a prompt and writes it as PNG,
// through libjanus's C API.
//
//   janus_example MODEL_DIR IMAGE OUT.png [QUESTION] [PROMPT]
#include "janus.h"

#include <cstdio>
#include <memory>
#include <stdexcept>
#include <string>

namespace {

// Throws the library's message when a call fails.
void check(janus_status status, const char *what) {
    if (status != JANUS_OK)
        throw std::runtime_error(std::string(what) + ": " + janus_status_string(status) + ": " +
                                 janus_last_error());
}

// Owners that give each result back to its free function.
struct model_free { void operator()(janus_model *m) const { janus_model_free(m); } };
struct answer_free { void operator()(janus_answer *a) const { janus_answer_free(a); } };
struct image_free { void operator()(janus_image *i) const { janus_image_free(i); } };
struct list_free { void operator()(janus_image_list *l) const { janus_image_list_free(l); } };

// Prints each piece of the answer as it comes.
bool print_piece(const char *piece, size_t len, void *) {
    std::fwrite(piece, 1, len, stdout);
    std::fflush(stdout);
    return true;
}

// Reports generation progress on one line.
bool show_progress(size_t step, size_t total, void *) {
    std::fprintf(stderr, "\rgenerating: %zu/%zu", step, total);
    if (step == total) std::fprintf(stderr, "\n");
    return true;
}

}  // namespace

int main(int argc, char **argv) {
    if (argc < 4) {
        std::fprintf(stderr, "usage: %s MODEL_DIR IMAGE OUT.png [QUESTION] [PROMPT]\n", argv[0]);
        return 2;
    }
    const char *question = argc > 4 ? argv[4] : "Describe this image.";
    const char *prompt = argc > 5 ? argv[5] : "a red fox in the snow";
    try {
        std::printf("libjanus %s\n", janus_version());

        janus_load_options load = janus_load_default_options();
        janus_model *m = nullptr;
        check(janus_model_load(argv[1], &load, &m), "loading the model");
        std::unique_ptr<janus_model, model_free> model(m);

        janus_image *img = nullptr;
        check(janus_image_read(argv[2], &img), "reading the image");
        std::unique_ptr<janus_image, image_free> image(img);

        janus_understand_options ask = janus_understand_default_options();
        ask.max_new_tokens = 64;
        std::printf("Q: %s\nA: ", question);
        janus_answer *a = nullptr;
        check(janus_understand_stream(model.get(), image.get(), 1, question, &ask, print_piece,
                                      nullptr, &a),
              "answering");
        std::unique_ptr<janus_answer, answer_free> answer(a);
        std::printf("\n(%zu tokens, prompt %zu tokens)\n", answer->n_token_ids,
                    answer->prompt_tokens);

        janus_generate_options gen = janus_generate_default_options();
        gen.seed = 42;
        gen.progress = show_progress;
        janus_image_list *l = nullptr;
        check(janus_generate(model.get(), prompt, &gen, &l), "generating");
        std::unique_ptr<janus_image_list, list_free> images(l);
        const janus_image &out = images->images[0].image;
        check(janus_image_write_png(&out, argv[3]), "writing the PNG");
        std::printf("wrote %s (%ux%u) for \"%s\"\n", argv[3], out.width, out.height, prompt);
    } catch (const std::exception &e) {
        std::fprintf(stderr, "error: %s\n", e.what());
        return 1;
    }
    return 0;
}
