# SVM_GIT_COMMIT: the commit of the source tree at configure time, with a
# "-dirty" suffix when tracked files were modified; empty without git.
set(SVM_GIT_COMMIT "")
find_package(Git QUIET)
if(GIT_FOUND AND EXISTS ${PROJECT_SOURCE_DIR}/.git)
  execute_process(COMMAND ${GIT_EXECUTABLE} rev-parse HEAD
    WORKING_DIRECTORY ${PROJECT_SOURCE_DIR} OUTPUT_VARIABLE SVM_GIT_COMMIT
    OUTPUT_STRIP_TRAILING_WHITESPACE ERROR_QUIET RESULT_VARIABLE _svm_git_rc)
  if(NOT _svm_git_rc EQUAL 0)
    set(SVM_GIT_COMMIT "")
  else()
    execute_process(COMMAND ${GIT_EXECUTABLE} diff-index --quiet HEAD --
      WORKING_DIRECTORY ${PROJECT_SOURCE_DIR} RESULT_VARIABLE _svm_dirty ERROR_QUIET)
    if(NOT _svm_dirty EQUAL 0)
      string(APPEND SVM_GIT_COMMIT "-dirty")
    endif()
  endif()
endif()
