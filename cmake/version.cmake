# Writes proxy/version.h with the commit the sources are at now. Run at every build (not only at
# configure time, when the commit would go stale); configure_file() rewrites the header only when
# its content changes, so an unchanged commit recompiles nothing.
#
#   cmake -DSOURCE_DIR=... -DIN=version.h.in -DOUT=version.h -DPROJECT_VERSION=x.y.z -P version.cmake
execute_process(COMMAND git rev-parse --short=12 HEAD
                WORKING_DIRECTORY ${SOURCE_DIR}
                OUTPUT_VARIABLE DMM_GIT_COMMIT OUTPUT_STRIP_TRAILING_WHITESPACE
                RESULT_VARIABLE rc ERROR_QUIET)
if(NOT rc EQUAL 0 OR NOT DMM_GIT_COMMIT)
  set(DMM_GIT_COMMIT "unknown")  # a source tarball: no git
else()
  execute_process(COMMAND git status --porcelain --untracked-files=no
                  WORKING_DIRECTORY ${SOURCE_DIR}
                  OUTPUT_VARIABLE dirty OUTPUT_STRIP_TRAILING_WHITESPACE ERROR_QUIET)
  if(dirty)
    string(APPEND DMM_GIT_COMMIT "-dirty")
  endif()
endif()
configure_file(${IN} ${OUT} @ONLY)
