#include "context.h"

#include <sys/stat.h>
#include <sys/utsname.h>
#include <unistd.h>

#include <algorithm>
#include <cstdio>
#include <cstdlib>
#include <ctime>
#include <fstream>
#include <iostream>
#include <thread>

#include "build_info.h"
#include "report.h"
#include "svm/version.h"

namespace svm::storm {
namespace {

std::string cpu_model() {
  std::ifstream in("/proc/cpuinfo");
  std::string line;
  while (std::getline(in, line)) {
    if (line.rfind("model name", 0) == 0 || line.rfind("Model", 0) == 0) {
      const auto colon = line.find(':');
      if (colon != std::string::npos) {
        std::string v = line.substr(colon + 1);
        v.erase(0, v.find_first_not_of(' '));
        return v;
      }
    }
  }
  return "";
}

std::string compiler() {
#if defined(__clang__)
  return "clang " __clang_version__;
#elif defined(__GNUC__)
  return "gcc " __VERSION__;
#else
  return SVM_STORM_COMPILER_ID;
#endif
}

std::string local_date() {
  const std::time_t now = std::time(nullptr);
  std::tm tm{};
  ::localtime_r(&now, &tm);
  char b[64];
  std::strftime(b, sizeof b, "%Y-%m-%dT%H:%M:%S%z", &tm);
  return b;
}

void flatten(const nlohmann::json& j, const std::string& prefix, std::vector<std::pair<std::string, std::string>>& out) {
  for (auto it = j.begin(); it != j.end(); ++it) {
    const std::string key = prefix.empty() ? it.key() : prefix + "." + it.key();
    const nlohmann::json& v = it.value();
    if (v.is_object()) flatten(v, key, out);
    else if (v.is_array()) continue;
    else if (v.is_string()) out.emplace_back(key, v.get<std::string>());
    else if (v.is_null()) out.emplace_back(key, "");
    else out.emplace_back(key, v.dump());
  }
}

std::string csv_field(const std::string& s) {
  if (s.find_first_of(",\"\n") == std::string::npos) return s;
  std::string q = "\"";
  for (char c : s) q += c == '"' ? std::string("\"\"") : std::string(1, c);
  return q + "\"";
}

}  // namespace

std::string version_text() {
  std::string commit = SVM_STORM_GIT_COMMIT;
  return std::string("svm-storm ") + svm::version() + " (commit " + (commit.empty() ? "unknown" : commit) + ", " +
         SVM_STORM_BUILD_TYPE + ", " + compiler() + ")";
}

nlohmann::json context_block(int argc, char** argv) {
  nlohmann::json c;
  c["date"] = local_date();
  char host[256] = {};
  if (::gethostname(host, sizeof host - 1) == 0) c["host_name"] = host;
  c["executable"] = argc > 0 ? argv[0] : "svm-storm";
  nlohmann::json args = nlohmann::json::array();
  for (int i = 1; i < argc; ++i) args.push_back(argv[i]);
  c["arguments"] = args;
  c["svm_version"] = svm::version();
  c["git_commit"] = SVM_STORM_GIT_COMMIT;
  c["build_type"] = SVM_STORM_BUILD_TYPE;
  c["compiler"] = compiler();
  c["cpu_model"] = cpu_model();
  c["hardware_threads"] = std::thread::hardware_concurrency();
  double load[3] = {0, 0, 0};
  if (::getloadavg(load, 3) == 3) c["load_avg"] = {load[0], load[1], load[2]};
  else c["load_avg"] = nullptr;
  utsname u{};
  if (::uname(&u) == 0) c["kernel"] = std::string(u.sysname) + " " + u.release + " " + u.machine;
  c["lock_checks"] = SVM_LOCK_CHECKS != 0;
  return c;
}

bool check_output_path(const std::string& path, const char* what, std::string& err) {
  if (path == "-") return true;
  if (path.empty()) {
    err = std::string(what) + ": empty path";
    return false;
  }
  struct stat st {};
  if (::stat(path.c_str(), &st) == 0) {
    if (S_ISDIR(st.st_mode)) {
      err = std::string(what) + " " + path + ": is a folder";
      return false;
    }
    if (::access(path.c_str(), W_OK) != 0) {
      err = std::string(what) + " " + path + ": not writable";
      return false;
    }
    return true;
  }
  const auto slash = path.find_last_of('/');
  const std::string dir = slash == std::string::npos ? "." : slash == 0 ? "/" : path.substr(0, slash);
  if (::stat(dir.c_str(), &st) != 0 || !S_ISDIR(st.st_mode)) {
    err = std::string(what) + " " + path + ": folder " + dir + " does not exist";
    return false;
  }
  if (::access(dir.c_str(), W_OK | X_OK) != 0) {
    err = std::string(what) + " " + path + ": folder " + dir + " is not writable";
    return false;
  }
  return true;
}

bool write_csv(const std::string& path, const std::vector<const run_result*>& runs, std::string& err) {
  std::vector<std::string> cols;
  std::vector<std::vector<std::pair<std::string, std::string>>> rows;
  for (const run_result* r : runs) {
    auto& row = rows.emplace_back();
    flatten(to_json(*r), "", row);
    for (const auto& [k, v] : row)
      if (std::find(cols.begin(), cols.end(), k) == cols.end()) cols.push_back(k);
  }
  std::ofstream file;
  if (path != "-") {
    file.open(path, std::ios::trunc);
    if (!file) {
      err = "cannot open " + path + " for writing";
      return false;
    }
  }
  std::ostream& out = path == "-" ? std::cout : file;
  for (std::size_t i = 0; i < cols.size(); ++i) out << (i ? "," : "") << csv_field(cols[i]);
  out << "\n";
  for (const auto& row : rows) {
    for (std::size_t i = 0; i < cols.size(); ++i) {
      std::string v;
      for (const auto& [k, val] : row)
        if (k == cols[i]) v = val;
      out << (i ? "," : "") << csv_field(v);
    }
    out << "\n";
  }
  out.flush();
  if (!out) {
    err = "write error on " + path;
    return false;
  }
  return true;
}

}  // namespace svm::storm
