// Measures the stack libstdc++'s std::regex_search needs per character of text, as llama.cpp
// runs it for a lazy grammar's trigger patterns: for each stack size, the longest text a
// thread of that size searches without overflowing (binary search, one forked child per try).
// g++ -O3 -pthread scripts/regex-stack.cpp -o /tmp/regex-stack && /tmp/regex-stack PATTERN MAX_CHARS
#include <regex>
#include <string>
#include <cstdio>
#include <cstdlib>
#include <pthread.h>
#include <sys/wait.h>
#include <unistd.h>
#include <chrono>
static std::string text; static std::regex *rx; static bool found;
static void* run(void*) { std::smatch m; found = std::regex_search(text, m, *rx); return nullptr; }
static bool ok(size_t n, size_t stack) {
  pid_t p = fork();
  if (p == 0) {
    text.clear(); const char* w = "Hello world, this is text. ";
    while (text.size() < n) text += w; text.resize(n);
    pthread_attr_t a; pthread_attr_init(&a); pthread_attr_setstacksize(&a, stack);
    pthread_t t; pthread_create(&t, &a, run, nullptr); pthread_join(t, nullptr); _exit(0);
  }
  int st; waitpid(p, &st, 0); return WIFEXITED(st) && WEXITSTATUS(st) == 0;
}
int main(int argc, char** argv) {
  setvbuf(stdout, nullptr, _IONBF, 0); rx = new std::regex(argv[1]);
  for (size_t mib : {2, 8}) {
    size_t stack = mib << 20, lo = 1, hi = strtoul(argv[2], 0, 10);
    while (hi - lo > 64) { size_t mid = (lo + hi) / 2; if (ok(mid, stack)) lo = mid; else hi = mid; }
    printf("%zu MiB: max %zu chars, %.0f bytes/char\n", mib, lo, (double)stack / lo);
  }
  // time of one search at 4k, 16k chars
  for (size_t n : {1000, 4000, 16000}) {
    text.clear(); while (text.size() < n) text += "Hello world, this is text. "; text.resize(n);
    pthread_attr_t a; pthread_attr_init(&a); pthread_attr_setstacksize(&a, 256 << 20);
    auto t0 = std::chrono::steady_clock::now();
    pthread_t t; pthread_create(&t, &a, run, nullptr); pthread_join(t, nullptr);
    printf("one search over %zu chars: %.1f ms\n", n, std::chrono::duration<double, std::milli>(std::chrono::steady_clock::now() - t0).count());
  }
}
