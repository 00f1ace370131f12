#include <cstdio>
int main() {
  std::puts("moepool");
  return 0;
}
